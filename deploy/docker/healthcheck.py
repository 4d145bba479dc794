"""The Docker HEALTHCHECK of elbasy's image: GET /healthz on the listen port.

Exit 0 when elbasy answers 200 with a JSON object, 1 otherwise. The port comes
from ELBASY_LISTEN (the image sets it), so a container started with another
``-e ELBASY_LISTEN=...`` is checked where it listens. Proxy variables in the
environment are ignored: the check asks elbasy itself, never through a proxy.
"""

import json
import os
import sys
import urllib.request


def main() -> int:
    listen = os.environ.get("ELBASY_LISTEN", "127.0.0.1:8080")
    port = listen.rpartition(":")[2]
    url = f"http://127.0.0.1:{port}/healthz"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as resp:
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
