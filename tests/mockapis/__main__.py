"""Run one mock API in its own process: ``python -m mockapis shopify|etsy|github CERT KEY``.

Prints ``port <n>`` once listening, then serves until its stdin closes (the
test that started it is done). Controlled over HTTP (``/__mock/...``).
"""

from __future__ import annotations

import ssl
import sys

from . import start_etsy, start_github, start_shopify
from .server import install_sni_recorder


def main() -> None:
    kind, cert, key = sys.argv[1:4]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    install_sni_recorder(ctx)
    starts = {"shopify": start_shopify, "etsy": start_etsy, "github": start_github}
    if kind not in starts:
        raise SystemExit(f"unknown mock {kind!r}: one of {', '.join(starts)}")
    mock = starts[kind](ctx)
    print(f"port {mock.port}", flush=True)
    try:
        sys.stdin.read()
    finally:
        mock.close()


if __name__ == "__main__":
    main()
