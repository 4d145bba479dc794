"""A real ``redis-server`` for the tests of elbasy's Redis quota store.

One server per test session, on a free loopback port, with persistence off
(``--save ''``, ``--appendonly no``) and its files in a temporary directory.
There is no fake: the Lua scripts must run on the server that runs them in
production. A missing ``redis-server`` is an error, never a skip (CI installs
it, see .ci/run), so the store's contract tests cannot silently not run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

#: how long a server may take to answer PING after it was started
START_TIMEOUT = 10.0


def free_port() -> int:
    """A loopback port nobody listens on (the kernel's pick; racy, but briefly)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int) -> bool:
    """True when a Redis server answers PING on the port (RESP by hand: no client needed)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A ``redis-server`` subprocess; :meth:`stop` (or the context manager) ends it."""

    def __init__(
        self,
        port: int | None = None,
        executable: str | None = None,
        *,
        extra: tuple[str, ...] = (),
        config: str | None = None,
    ) -> None:
        """``extra``: more arguments (``--replicaof``, ``--cluster-enabled``);
        ``config``: a config file's text, put first (``--sentinel`` needs one)."""
        exe = executable or os.environ.get("ELBASY_TEST_REDIS_SERVER") or "redis-server"
        path = shutil.which(exe)
        if path is None:
            raise RuntimeError(
                f"{exe!r} not found: the Redis store's tests need a real redis-server "
                "(apt-get install redis-server; .ci/run installs it)"
            )
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.mkdtemp(prefix="elbasy-redis-")
        self._log = Path(self._dir) / "redis.log"
        head = [path]
        if config is not None:
            conf = Path(self._dir) / "redis.conf"
            conf.write_text(config)
            head.append(str(conf))
        self.proc = subprocess.Popen(
            [
                *head,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir,
                "--logfile",
                str(self._log),
                *extra,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not _ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self._log.read_text() if self._log.exists() else "(no log)"
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{log}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
