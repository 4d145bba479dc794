"""A mock API in a process of its own, driven over its ``/__mock/`` routes.

The pacing load tests run hundreds of client threads; a mock in the same
process would share their interpreter lock, and the test would measure the
harness instead of elbasy.
"""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


class RemoteMock:
    """``python -m mockapis KIND`` on 127.0.0.1:<port>, over TLS with the test CA's leaf."""

    def __init__(self, kind: str, cert: Path, key: Path, ca_file: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mockapis", kind, str(cert), str(key)],
            cwd=str(HERE.parent),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("port "):
            self.proc.kill()
            raise RuntimeError(f"the {kind} mock did not start: {line!r}")
        self.port = int(line.split()[1])
        self._ctx = ssl.create_default_context(cafile=str(ca_file))
        self._ctx.check_hostname = False

    def _call(self, method: str, path: str, obj: Any = None) -> Any:
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self._ctx, timeout=30)
        try:
            body = json.dumps(obj).encode() if obj is not None else None
            conn.request(method, path, body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = json.loads(resp.read())
            if resp.status != 200:
                raise RuntimeError(f"{method} {path}: {resp.status} {data}")
            return data
        finally:
            conn.close()

    def configure(self, **settings: Any) -> None:
        self._call("POST", "/__mock/config", settings)

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/__mock/state")
        return result

    def key_stats(self, shop_or_key: str, token: str | None = None) -> dict[str, Any]:
        """One key's state: a Shopify (shop, token), or an Etsy API key."""
        name = shop_or_key if token is None else f"{shop_or_key}/{token}"
        keys: dict[str, Any] = self.stats()["keys"]
        return keys[name]

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
