"""A client sent to elbasy's --transparent port by an iptables REDIRECT rule.

Run as ``unshare -n python tests/redirected.py TEST_CA_DIR``, in a network
namespace of its own (loopback only, up), as tests/test_transparent.py does:

* a TLS origin for ``api.example.test`` listens on 127.0.0.1;
* elbasy listens with ``--transparent 127.0.0.1:4443``, and ``--connect-to``
  sends only the *address* 10.9.9.9:443 to the origin (the name has no route);
* ``iptables -t nat -A OUTPUT -d 10.9.9.9 -p tcp --dport 443 -j REDIRECT
  --to-ports 4443`` sends what the client addresses to 10.9.9.9:443 to elbasy;
* curl asks for ``https://api.example.test/hello`` resolved to 10.9.9.9.

elbasy must splice to where the client meant to go, read from SO_ORIGINAL_DST
(10.9.9.9:443, which the operator's --connect-to leads to the origin), and
not to the name (which leads nowhere here). Prints one JSON line with what
curl got and what elbasy logged.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import origins  # noqa: E402
from conftest import Proxy  # noqa: E402

NAME = "api.example.test"
MEANT = "10.9.9.9"


def main() -> None:
    where = Path(sys.argv[1])
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(
        ["iptables", "-t", "nat", "-A", "OUTPUT", "-d", MEANT, "-p", "tcp", "--dport", "443"]
        + ["-j", "REDIRECT", "--to-ports", "4443"],
        check=True,
    )
    # 10.9.9.9 is made local, so the connect has a route; the REDIRECT takes it from there
    subprocess.run(["ip", "addr", "add", f"{MEANT}/32", "dev", "lo"], check=True)
    ca = origins.make_ca(where)
    cert, key = origins.make_leaf(ca, where, names=(NAME,), ips=("127.0.0.1",))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    origin = origins.HTTPOrigin(tls=ctx)
    route = f"{MEANT}:443:127.0.0.1:{origin.port}"
    data = str(where / "data")
    proxy = Proxy(["--data-dir", data, "--transparent", "127.0.0.1:4443", "--connect-to", route])
    try:
        out = subprocess.run(
            ["curl", "-sS", "--max-time", "15", "--cacert", str(ca.path)]
            + ["--resolve", f"{NAME}:443:{MEANT}", f"https://{NAME}/hello"],
            capture_output=True,
            timeout=30,
        )
        health = proxy.healthz()
    finally:
        proxy.stop()
        origin.close()
    print(
        json.dumps(
            {
                "curl_rc": out.returncode,
                "body": out.stdout.decode(errors="replace"),
                "curl_err": out.stderr.decode(errors="replace"),
                "tunnels": health["connections"]["tunnels_total"],
                "origin_requests": len(origin.requests_for("/hello")),
                "log": proxy.stderr[-3000:],
            }
        )
    )


if __name__ == "__main__":
    main()
