"""Fixtures for elbasy's integration tests: the proxy as a real subprocess, local origins, a CA."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import resource
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import origins
import pytest
from redis_server import RedisServer

PROXY_ENV_VARS = (
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "ftp_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "FTP_PROXY",
)
# the banner: a line of its own in text, the message of a JSON or logfmt record
STARTUP_RE = re.compile(
    r'elbasy ([^\s"]+) listening on ([0-9.]+|\[[0-9a-fA-F:]+\]):(\d+)(?:"|\s*$)'
)
REPO = Path(__file__).resolve().parent.parent
_DATA_HOME = tempfile.mkdtemp(prefix="elbasy-test-data-")
#: what every test's elbasy is started with unless it asks for the default
#: destination rules (``guarded=True``): the test origins listen on loopback,
#: on ports of their own, so loopback is allowed explicitly and any port too
OPEN_DESTINATIONS = (
    "--allow-internal",
    "127.0.0.1",
    "--allow-internal",
    "localhost",
    "--allow-internal",
    "::1",
    "--allow-ports",
    "1-65535",
)


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients in the tests must use the proxy we pass them, never one from the environment."""
    for name in PROXY_ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def _clean_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in PROXY_ENV_VARS and not k.startswith("ELBASY_")
    }
    env["PYTHONUNBUFFERED"] = "1"
    # elbasy makes its CA in the data dir on first run: never the user's own
    env["XDG_DATA_HOME"] = _DATA_HOME
    return env


class Proxy:
    """A running `python -m elbasy` subprocess."""

    def __init__(
        self,
        args: list[str],
        nofile: int | None = None,
        env: dict[str, str] | None = None,
        guarded: bool = False,
        prefix: tuple[str, ...] = (),
    ) -> None:
        """Start elbasy; with `nofile`, under that RLIMIT_NOFILE (soft and hard,
        since elbasy lifts its soft limit to the hard one); `env` adds variables;
        `guarded`: with the default destination rules (else OPEN_DESTINATIONS);
        `prefix`: a command that execs the rest (its pid stays elbasy's)."""
        self.args = args

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(
            [
                *prefix,
                sys.executable,
                "-m",
                "elbasy",
                "--listen",
                "127.0.0.1:0",
                *(() if guarded else OPEN_DESTINATIONS),
                *args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**_clean_env(), **(env or {})},
            cwd=str(REPO),
            preexec_fn=limit if nofile is not None else None,
        )
        self.pid = self.proc.pid
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._started = threading.Event()
        self.version: str | None = None
        self.port: int = 0
        self.stopped_by_test = False  # a test that stops the process itself sets this
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        if not self._started.wait(10):
            self.proc.kill()
            self.proc.wait(5)
            self._reader.join(2)
            raise AssertionError(
                f"elbasy did not print its startup line within 10 s; exit={self.proc.returncode}"
                f"\nstderr:\n{self.stderr}"
            )
        if self.port == 0:
            self.proc.kill()
            self._reader.join(2)
            raise AssertionError(f"elbasy exited before listening; stderr:\n{self.stderr}")
        self.host = "127.0.0.1"
        self.url = f"http://127.0.0.1:{self.port}"

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace")
            with self._lock:
                self._lines.append(line)
            if not self._started.is_set():
                m = STARTUP_RE.search(line.rstrip("\n"))
                if m:
                    self.version = m.group(1)
                    self.port = int(m.group(3))
                    self._started.set()
        self._started.set()  # EOF: unblock the waiter either way

    @property
    def stderr(self) -> str:
        with self._lock:
            return "".join(self._lines)

    @property
    def stderr_lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    # -- talking to it -------------------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def healthz(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", "/healthz", headers={"Connection": "close"})
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200, (resp.status, body)
            ctype = resp.getheader("Content-Type", "")
            assert ctype.split(";")[0].strip() == "application/json", ctype
            return json.loads(body)
        finally:
            conn.close()

    # -- its processes: `pid` is the supervisor; the workers (its children) serve -------------

    def worker_pids(self) -> list[int]:
        """The live worker processes: the supervisor's children."""
        kids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # fields[1] is the ppid (field 4); "Z": a zombie the supervisor has yet to reap
            if int(fields[1]) == self.pid and fields[0] != "Z":
                kids.append(int(entry))
        return sorted(kids)

    @property
    def worker_pid(self) -> int:
        """The one worker's pid (with --workers 1, the default)."""
        pids = self.worker_pids()
        assert len(pids) == 1, f"expected one worker, found {pids}"
        return pids[0]

    def fd_count(self) -> int:
        """Open fds of the worker processes (the supervisor's own do not change)."""
        total = 0
        for pid in self.worker_pids():
            with contextlib.suppress(FileNotFoundError):
                total += len(os.listdir(f"/proc/{pid}/fd"))
        return total

    def fds_in_use(self, h: dict) -> int:
        """The workers' fds less the ones kept for reuse (pooled pipes and upstreams),
        ``h`` their /healthz read at the same moment."""
        return self.fd_count() - 2 * h["live"]["pipes_pooled"] - h["connections"]["upstream_idle"]

    def cpu_seconds(self) -> float:
        """User + system CPU time elbasy has used so far: the supervisor, its live
        workers, and the workers it has reaped (its cutime and cstime)."""
        ticks = 0
        for pid in (self.pid, *self.worker_pids()):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # fields[0] is the state (field 3): utime, stime, cutime, cstime are fields 14-17
            ticks += int(fields[11]) + int(fields[12])
            if pid == self.pid:
                ticks += int(fields[13]) + int(fields[14])
        return ticks / os.sysconf("SC_CLK_TCK")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def lines_with(self, text: str, count: int, timeout: float = 5.0) -> list[str]:
        """Its stderr lines holding ``text``, once there are ``count`` of them (or the
        timeout passed): a line is read from the pipe a moment after elbasy writes it."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self.stderr_lines if text in line]
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            time.sleep(0.02)

    def wait_open_connections(self, expected: int, timeout: float = 5.0) -> dict:
        """Poll /healthz until connections.open == expected (the healthz conn counts itself)."""
        deadline = time.monotonic() + timeout
        while True:
            h = self.healthz()
            if h["connections"]["open"] == expected or time.monotonic() > deadline:
                return h
            time.sleep(0.1)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                self._reader.join(2)
                return None
        self._reader.join(2)
        return self.proc.returncode


def _start_factory() -> tuple[Callable[..., Proxy], list[Proxy]]:
    started: list[Proxy] = []

    def start(
        *args: str,
        env: dict[str, str] | None = None,
        guarded: bool = False,
        prefix: tuple[str, ...] = (),
    ) -> Proxy:
        p = Proxy([str(a) for a in args], env=env, guarded=guarded, prefix=prefix)
        started.append(p)
        return p

    return start, started


def _stop_all(started: list[Proxy]) -> None:
    problems = []
    for p in started:
        was_alive = p.alive()
        code = p.stop()
        problem = None
        if not was_alive and not p.stopped_by_test:
            problem = f"elbasy pid {p.pid} had already exited with {p.proc.returncode}"
        elif code != 0:
            problem = f"elbasy pid {p.pid} exit code after SIGTERM: {code} (expected 0 within 5 s)"
        if problem:
            problems.append(problem + "\nstderr tail:\n" + "".join(p.stderr_lines[-30:]))
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture(scope="module")
def api_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[origins.TestCA, Path]:
    """A test CA for a module's API origins (its leaves' directory beside it)."""
    where = tmp_path_factory.mktemp("apis")
    return origins.make_ca(where), where


@pytest.fixture
def proxy() -> Iterator[Callable[..., Proxy]]:
    """Factory: ``p = proxy("--head-timeout", "2")`` starts elbasy on 127.0.0.1:0.

    Every proxy started is stopped with SIGTERM at teardown and must exit 0 within 5 s.
    """
    start, started = _start_factory()
    yield start
    _stop_all(started)


@pytest.fixture(scope="module")
def module_proxy() -> Iterator[Proxy]:
    """One default elbasy shared by a module's tests that do not look at global counters."""
    start, started = _start_factory()
    yield start()
    _stop_all(started)


# -- origins -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> origins.TestCA:
    return origins.make_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="session")
def client_ssl_ctx(test_ca: origins.TestCA) -> ssl.SSLContext:
    """A client context trusting only the test CA."""
    ctx = ssl.create_default_context(cafile=str(test_ca.path))
    return ctx


@pytest.fixture(scope="session")
def server_ssl_ctx(
    test_ca: origins.TestCA, tmp_path_factory: pytest.TempPathFactory
) -> ssl.SSLContext:
    cert, key = origins.make_leaf(test_ca, tmp_path_factory.mktemp("leaf"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


@pytest.fixture
def http_origin() -> Iterator[origins.HTTPOrigin]:
    o = origins.HTTPOrigin()
    yield o
    o.close()


@pytest.fixture
def tls_origin(server_ssl_ctx: ssl.SSLContext) -> Iterator[origins.HTTPOrigin]:
    o = origins.HTTPOrigin(tls=server_ssl_ctx)
    yield o
    o.close()


@pytest.fixture
def raw_origin() -> Iterator[Callable[..., origins.RawOrigin]]:
    """Factory: ``raw_origin(handler)`` starts a RawOrigin."""
    made: list[origins.RawOrigin] = []

    def make(handler: Callable[[socket.socket, origins.RawOrigin], None]) -> origins.RawOrigin:
        o = origins.RawOrigin(handler)
        made.append(o)
        return o

    yield make
    for o in made:
        o.close()


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A local port that refuses connections (bound, not listening, held for the test)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]
    s.close()


@pytest.fixture
def blackhole() -> Iterator[origins.Blackhole]:
    b = origins.Blackhole()
    yield b
    b.close()


@pytest.fixture
def raw() -> Callable[..., tuple[origins.Response, bool]]:
    return origins.send_and_read


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session (a missing binary fails, never skips)."""
    server = RedisServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis server with an empty database 0 (flushed, scripts too)."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushdb()
        client.script_flush()
    finally:
        client.close()
    return redis_server.url
