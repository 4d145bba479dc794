"""elbasy's processes: the supervisor, its workers, and the signals they obey.

Real processes, real sockets, the real CLI (``python -m elbasy``). Every load
loop here is bounded in count and in time, on loopback only.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import origins
import pytest
from origins import send_and_read

# a paced API on a local origin: one request per 0.5 s for each key
PACED = """
connect_to = ["api.example.com:80:127.0.0.1:{port}"]
rules = ["local-api"]
{extra}
[[rule]]
id = "local-api"
docs = ["https://example.com/limits"]
match = {{ hosts = ["api.example.com"], path = "^/" }}
account.parts = [{{ name = "key", from = "header", header = "X-Api-Key", hash = true }}]
[[rule.limits]]
name = "per-second"
kind = "bucket"
capacity = 1
rate = 2
source = "https://example.com/limits"
"""
PACED_GET = (
    b"GET http://api.example.com/hello HTTP/1.1\r\nHost: api.example.com\r\nX-Api-Key: k\r\n"
)


def healthz_on(s: socket.socket) -> dict:
    """GET /healthz on an open keep-alive connection."""
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    reader = origins.Reader(s)
    resp = origins.read_response(reader)
    assert resp.status == 200
    return json.loads(resp.body)


def get_healthz(port: int, timeout: float = 5) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/healthz", headers={"Connection": "close"})
        resp = conn.getresponse()
        assert resp.status == 200
        return json.loads(resp.read())
    finally:
        conn.close()


def wait_for(cond, timeout: float = 10.0, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(step)
    return cond()


class Load:
    """Client threads sending GET /healthz until stopped (bounded: count and time).

    ``new``: threads that open a new connection per request; ``keep``: threads
    that keep one connection alive and open another when the proxy closes it.
    A request on a kept-alive connection that the proxy closed while it was
    idle (no byte of an answer came) is sent again on a new connection, as
    HTTP clients do with idempotent requests: counted in ``retried``.
    """

    def __init__(self, port: int, new: int = 2, keep: int = 1, max_requests: int = 20000):
        self.port = port
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.failures: list[str] = []
        self.retried = 0
        self.pids: Counter[int] = Counter()
        self.max_requests = max_requests
        self.threads = [threading.Thread(target=self._new, daemon=True) for _ in range(new)]
        self.threads += [threading.Thread(target=self._keep, daemon=True) for _ in range(keep)]
        self.deadline = time.monotonic() + 60
        for t in self.threads:
            t.start()

    def _more(self) -> bool:
        with self.lock:
            done = self.ok + len(self.failures)
        return (
            not self.stop.is_set()
            and done < self.max_requests
            and (time.monotonic() < self.deadline)
        )

    def _count(self, body: bytes) -> None:
        h = json.loads(body)
        with self.lock:
            self.ok += 1
            self.pids[h["pid"]] += 1

    def _fail(self, why: str) -> None:
        with self.lock:
            self.failures.append(why)

    def _new(self) -> None:
        while self._more():
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("GET", "/healthz", headers={"Connection": "close"})
                resp = conn.getresponse()
                body = resp.read()
                conn.close()
                if resp.status != 200:
                    self._fail(f"status {resp.status}")
                else:
                    self._count(body)
            except OSError as e:
                self._fail(f"new connection: {e!r}")

    def _keep(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while self._more():
            reused = conn.sock is not None
            try:
                conn.request("GET", "/healthz")
                resp = conn.getresponse()
                body = resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                conn.close()
                if reused:  # closed while idle between requests: send it again
                    with self.lock:
                        self.retried += 1
                    continue
                self._fail(f"keep-alive, fresh connection: {e!r}")
                continue
            except OSError as e:
                conn.close()
                self._fail(f"keep-alive: {e!r}")
                continue
            if resp.status != 200:
                self._fail(f"status {resp.status}")
            else:
                self._count(body)
        conn.close()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)


# --------------------------------------------------------------------------- workers


def test_two_workers_serve_and_share_the_connections(proxy):
    p = proxy("--workers", "2")
    pids = p.worker_pids()
    assert len(pids) == 2 and p.pid not in pids
    seen: Counter[tuple[int, int]] = Counter()
    for _ in range(200):
        h = get_healthz(p.port)
        seen[(h["pid"], h["worker"])] += 1
    assert {pid for pid, _ in seen} == set(pids), seen
    assert {slot for _, slot in seen} == {0, 1}, seen
    # each takes a fair part (EPOLLEXCLUSIVE: one waiter woken per connection)
    assert min(seen.values()) >= 20, seen
    assert sum(1 for ln in p.stderr_lines if "listening on" in ln) == 1  # the banner, once


def test_the_intercepting_line_fits_a_terminal(proxy):
    """With every built-in rule on (12 hosts), the startup line names the first hosts and
    how many more, within 120 columns with its time stamp (it was 450)."""
    from elbasy.config import Config
    from elbasy.server import intercepted_hosts

    hosts = intercepted_hosts(Config(), Config().ruleset())
    assert len(hosts) > 5
    p = proxy()
    deadline = time.monotonic() + 10
    while not (lines := [ln.rstrip("\n") for ln in p.stderr_lines if " intercepting " in ln]):
        assert time.monotonic() < deadline, p.stderr
        time.sleep(0.05)
    assert len(lines) == 1 and len(lines[0]) <= 120, lines
    assert f" intercepting {len(hosts)} hosts: {hosts[0]}, {hosts[1]} +" in lines[0]
    assert lines[0].endswith(" more")
    assert any(ln.rstrip("\n").endswith("elbasy ca trust-help") for ln in p.stderr_lines)


def test_a_killed_worker_is_restarted_and_the_others_serve_on(proxy):
    p = proxy("--workers", "2")
    victim, survivor = p.worker_pids()
    # a kept-alive connection on the victim, to see what its clients see
    held = None
    for _ in range(50):
        s = p.connect()
        if healthz_on(s)["pid"] == victim:
            held = s
            break
        s.close()
    assert held is not None
    load = Load(p.port, new=2, keep=1)
    time.sleep(0.5)
    os.kill(victim, signal.SIGKILL)
    # the victim's idle keep-alive client: the kernel closed its socket (a FIN)
    held.settimeout(5)
    assert held.recv(1) == b""
    held.close()
    restarted = wait_for(lambda: [x for x in p.worker_pids() if x not in (victim, survivor)])
    assert restarted, p.stderr
    time.sleep(0.5)
    load.finish()
    assert any(
        f"worker 0 (pid {victim}) killed by SIGKILL; restarting in 0.1 s" in ln
        or f"(pid {victim}) killed by SIGKILL; restarting in 0.1 s" in ln
        for ln in p.stderr_lines
    ), p.stderr
    # the only failures possible are requests in flight on the victim when it died:
    # each client thread has at most one in flight
    assert len(load.failures) <= 3, load.failures
    print(f"kill -9 under load: {load.ok} ok, failures {load.failures}, {load.retried} retried")
    assert load.ok > 50
    assert load.pids[survivor] > 0 and load.pids[restarted[0]] > 0, load.pids
    h = get_healthz(p.port)
    assert h["worker"] in (0, 1)


def test_a_worker_that_keeps_dying_never_takes_the_supervisor_down(proxy):
    p = proxy("--workers", "1")
    for _ in range(3):
        pid = p.worker_pid
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda pid=pid: [x for x in p.worker_pids() if x != pid], 15)
    lines = [ln for ln in p.stderr_lines if "killed by SIGKILL; restarting in" in ln]
    assert [ln.split("restarting in ")[1].strip() for ln in lines] == ["0.1 s", "0.2 s", "0.4 s"]
    assert wait_for(lambda: get_healthz(p.port)["pid"] in p.worker_pids())


def _elbasy_fails(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "elbasy", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=str(Path(__file__).resolve().parent.parent),
        env={**os.environ, "XDG_DATA_HOME": str(tmp_path)},
    )


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one ``Error:`` line of a failed start, exit status 2 (a bad option's), no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_busy_port_is_a_one_line_error(tmp_path: Path, workers: str):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        proc = _elbasy_fails(tmp_path, "--listen", f"127.0.0.1:{port}", "--workers", workers)
    finally:
        taken.close()
    assert _one_error_line(proc) == (
        f"Error: cannot listen on 127.0.0.1:{port}: address already in use "
        "(try --listen 127.0.0.1:PORT)"
    )


@pytest.mark.parametrize(
    ("option", "value", "where"),
    [
        ("--listen", "127.0.0.1:{port}", "127.0.0.1:{port}"),
        ("--reverse", "127.0.0.1:{port}=http://127.0.0.1:9", "127.0.0.1:{port} for --reverse"),
        ("--metrics-listen", "127.0.0.1:{port}", "127.0.0.1:{port} for --metrics-listen"),
    ],
)
def test_a_second_elbasy_on_a_running_ones_port_is_a_one_line_error(
    proxy, tmp_path: Path, option: str, value: str, where: str
):
    """The first one's SO_REUSEPORT listeners would take in a second elbasy's
    (same user) without a word, each then getting half the connections: the
    second must refuse to start instead, and the first serve on as before."""
    p = proxy("--workers", "2")
    workers = set(p.worker_pids())
    port = p.port
    args = [option, value.format(port=port), "--workers", "2"]
    if option != "--listen":
        args = ["--listen", "127.0.0.1:0", *args]
    second = subprocess.Popen(
        [sys.executable, "-m", "elbasy", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(Path(__file__).resolve().parent.parent),
        env={**os.environ, "XDG_DATA_HOME": str(tmp_path)},
    )
    try:
        _, err = second.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        second.kill()
        second.communicate()
        raise AssertionError(f"a second elbasy started on port {port}, the first's") from None
    proc = subprocess.CompletedProcess(second.args, second.returncode, "", err)
    named = f"{option} {value.format(port=port)}: " if option == "--reverse" else ""
    assert _one_error_line(proc) == (
        f"Error: {named}cannot listen on {where.format(port=port)}: address already in use "
        f"(try {option} 127.0.0.1:PORT)"
    )
    # the first one serves on, every connection answered by its own workers
    for _ in range(20):
        assert get_healthz(port)["pid"] in workers
    assert set(p.worker_pids()) == workers


def test_an_address_this_host_lacks_is_a_one_line_error(tmp_path: Path):
    # 192.0.2.0/24 is TEST-NET-1: documentation only, never a local address
    proc = _elbasy_fails(tmp_path, "--listen", "192.0.2.1:8080")
    assert _one_error_line(proc) == (
        "Error: cannot listen on 192.0.2.1:8080: this host has no address 192.0.2.1 "
        "(try --listen 127.0.0.1:8080, or 0.0.0.0:8080 for every address)"
    )


# --------------------------------------------------------------------------- SIGHUP


def test_sighup_reloads_with_no_failed_request(proxy, tmp_path: Path):
    config = tmp_path / "elbasy.toml"
    config.write_text("max-head-bytes = 65536\n")
    p = proxy("--config", str(config), "--workers", "2", "--drain-timeout", "5")
    old = set(p.worker_pids())
    padded = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: " + b"a" * 3000
    resp, _ = send_and_read(p, padded + b"\r\n\r\n")
    assert resp.status == 200
    load = Load(p.port, new=2, keep=2)
    time.sleep(0.7)
    config.write_text("max-head-bytes = 2048\n")
    p.proc.send_signal(signal.SIGHUP)
    new = wait_for(
        lambda: (set(p.worker_pids()) - old) if not (old & set(p.worker_pids())) else None
    )
    assert new and len(new) == 2, p.stderr
    time.sleep(0.7)
    load.finish()
    assert load.failures == [], load.failures
    assert load.ok > 100
    assert set(load.pids) & old and set(load.pids) & new  # served before and after
    # the new setting is in force
    resp, closed = send_and_read(p, padded + b"\r\n\r\n")
    assert resp.status == 431 and closed
    assert any("reloaded: 2 new worker(s) ready" in ln for ln in p.stderr_lines)
    assert "Traceback" not in p.stderr
    print(f"reload under load: {load.ok} requests, 0 failed, {load.retried} retried")


def test_sighup_with_a_bad_config_keeps_the_workers(proxy, tmp_path: Path):
    config = tmp_path / "elbasy.toml"
    config.write_text("max-head-bytes = 4096\n")
    p = proxy("--config", str(config))
    pid = p.worker_pid
    config.write_text("max-head-bytes = 12\n")
    p.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: any("reload failed" in ln for ln in p.stderr_lines))
    errors = [ln for ln in p.stderr_lines if "reload failed" in ln]
    assert len(errors) == 1 and "--max-head-bytes" in errors[0], errors
    assert p.worker_pid == pid
    assert get_healthz(p.port)["pid"] == pid


# --------------------------------------------------------------------------- SIGTERM, Ctrl-C


def paced_proxy(proxy, tmp_path: Path, http_origin, *args: str):
    config = tmp_path / "paced.toml"
    config.write_text(PACED.format(port=http_origin.port, extra=""))
    return proxy("--config", str(config), "--data-dir", str(tmp_path / "data"), *args)


def send_paced(p, n: int) -> tuple[list, list[threading.Thread]]:
    """n paced requests of one account, each on its own connection, at once."""
    results: list = [None] * n

    def one(i: int) -> None:
        try:
            results[i] = send_and_read(p, PACED_GET + b"Connection: close\r\n\r\n", timeout=20)
        except Exception as e:  # a reset or a close without an answer
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return results, threads


def test_sigterm_lets_held_requests_finish_and_exits_0(proxy, tmp_path, http_origin):
    p = paced_proxy(proxy, tmp_path, http_origin, "--drain-timeout", "10")
    results, threads = send_paced(p, 5)  # departures 0.5 s apart: the last at about 2 s
    time.sleep(0.5)
    p.stopped_by_test = True
    start = time.monotonic()
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(15) == 0, p.stderr
    took = time.monotonic() - start
    for t in threads:
        t.join(5)
    statuses = [r[0].status if isinstance(r, tuple) else repr(r) for r in results]
    assert statuses == [200] * 5, (statuses, p.stderr)
    assert took < 10, took
    assert "Traceback" not in p.stderr


def test_a_short_drain_answers_the_rest_503_with_retry_after(proxy, tmp_path, http_origin):
    p = paced_proxy(proxy, tmp_path, http_origin, "--drain-timeout", "0.6")
    results, threads = send_paced(p, 8)  # the last would leave at about 3.5 s
    time.sleep(0.5)
    p.stopped_by_test = True
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(10) == 0, p.stderr
    for t in threads:
        t.join(5)
    assert all(isinstance(r, tuple) for r in results), results  # an answer each, no reset
    statuses = Counter(r[0].status for r in results)
    assert set(statuses) == {200, 503} and statuses[503] >= 3, statuses
    for resp, closed in results:
        if resp.status == 503:
            assert resp.headers.get("Retry-After") == "1"
            assert "shutting down" in resp.text
            assert closed


def test_a_second_ctrl_c_stops_at_once(proxy, tmp_path, http_origin):
    p = paced_proxy(proxy, tmp_path, http_origin, "--drain-timeout", "30")
    results, threads = send_paced(p, 30)  # 15 s of departures
    time.sleep(0.5)
    p.stopped_by_test = True
    p.proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert p.alive()  # the first one drains
    start = time.monotonic()
    p.proc.send_signal(signal.SIGINT)
    assert p.proc.wait(5) == 0, p.stderr
    assert time.monotonic() - start < 2
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads)
    assert p.lines_with("stopping now", 1), p.stderr


def test_workers_ignore_a_ctrl_c_sent_to_them(proxy):
    """A terminal's Ctrl-C reaches the whole process group: a worker obeys the supervisor only."""
    p = proxy("--workers", "1")
    pid = p.worker_pid
    os.kill(pid, signal.SIGINT)
    time.sleep(0.3)
    assert p.worker_pid == pid
    assert get_healthz(p.port)["pid"] == pid


def test_draining_closes_idle_keep_alive_connections(proxy):
    p = proxy("--drain-timeout", "10")
    s = p.connect()
    assert healthz_on(s)["connections"]["open"] >= 1
    p.stopped_by_test = True
    p.proc.send_signal(signal.SIGTERM)
    s.settimeout(5)
    assert s.recv(1) == b""  # closed at once, cleanly
    s.close()
    assert p.proc.wait(5) == 0


# --------------------------------------------------------------------------- SIGUSR1


def test_sigusr1_reopens_the_log_file(proxy, tmp_path: Path):
    log = tmp_path / "elbasy.log"
    p = proxy("--log-file", str(log), "--workers", "2")
    get_healthz(p.port)
    assert wait_for(lambda: "GET /healthz 200" in log.read_text())
    rotated = tmp_path / "elbasy.log.1"
    log.rename(rotated)
    p.proc.send_signal(signal.SIGUSR1)
    assert wait_for(lambda: log.exists() and "log files reopened" in log.read_text())
    # every worker writes to the new file now
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        get_healthz(p.port)
        if log.read_text().count("GET /healthz 200") >= 10:
            break
    new_text = log.read_text()
    assert new_text.count("GET /healthz 200") >= 10
    assert "GET /healthz 200" in rotated.read_text()
    before = rotated.read_text()
    get_healthz(p.port)
    time.sleep(0.2)
    assert rotated.read_text() == before  # nothing more goes to the old one
