"""The Docker HEALTHCHECK of elbasy's image: GET /healthz on the listen port.

Exit 0 when elbasy answers 200 with a JSON object, 1 otherwise. The port comes
from ELBASY_LISTEN (the image sets it), so a container started with another
``-e ELBASY_LISTEN=...`` is checked where it listens. Proxy variables in the
environment are ignored: the check asks elbasy itself, never through a proxy.
When elbasy asks for credentials (ELBASY_AUTH_FILE, ELBASY_AUTH_ENV), the
check sends the first one it finds there as ``Authorization: Basic``.
"""

import base64
import json
import os
import sys
import urllib.request


def credential() -> str | None:
    """The first credential of elbasy's --auth-file or --auth-env, if it has one."""
    path = os.environ.get("ELBASY_AUTH_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    entry = line.strip()
                    if entry and not entry.startswith("#"):
                        return entry
        except OSError:
            pass
    name = os.environ.get("ELBASY_AUTH_ENV")
    values = os.environ.get(name, "").split() if name else []
    return values[0] if values else None


def main() -> int:
    listen = os.environ.get("ELBASY_LISTEN", "127.0.0.1:8080")
    port = listen.rpartition(":")[2]
    url = f"http://127.0.0.1:{port}/healthz"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url)
    secret = credential()
    if secret is not None:
        # a pair as it is; a token as the password (elbasy.access takes both)
        pair = secret if ":" in secret else f"elbasy:{secret}"
        request.add_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
    try:
        with opener.open(request, timeout=5) as resp:
            health = json.load(resp)
    except (OSError, ValueError) as exc:
        print(f"elbasy healthcheck: {url}: {exc}", file=sys.stderr)
        return 1
    if not isinstance(health, dict):
        print(f"elbasy healthcheck: {url} did not answer a JSON object", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
