#!/usr/bin/env python3
"""What one request head costs the policy: a plain one, and the probe's of issue 16.

The probe's head names 3,000 headers in ``Connection`` and carries each of
them (63 KB); the plain one has 3,700 ordinary lines (85 KB). Each is handed
to ``Policy.on_request`` as the loop would hand it, in one process, no
sockets. With ``--no-caps`` the header-line and Connection caps of
elbasy.protocol.http1 are lifted, so the cost of dropping the named lines
shows (linear since issue 16; it was lines times names).

    PYTHONPATH=. python3 bench/heads.py [--no-caps]
"""

from __future__ import annotations

import argparse
import timeit

import elbasy.protocol.http1 as http1
from elbasy.policy import Policy


def heads() -> dict[str, bytes]:
    start = b"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: 127.0.0.1:9\r\n"
    names = [b"x-h%04d" % i for i in range(3000)]
    connection = b"Connection: " + b", ".join(names) + b"\r\n"
    named = start + connection + b"".join(n + b": v\r\n" for n in names) + b"\r\n"
    plain = start + b"".join(b"x-p%04d: %s\r\n" % (i, b"v" * 12) for i in range(3700)) + b"\r\n"
    return {"connection names 3,000": named, "plain": plain}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-caps", action="store_true", help="lift the header and option caps")
    parser.add_argument("--number", type=int, default=20, help="calls per timing")
    args = parser.parse_args()
    if args.no_caps:
        http1.MAX_HEADER_LINES = http1.MAX_CONNECTION_OPTIONS = 1 << 30
    policy = Policy(lambda: {})
    for label, head in heads().items():
        verdict = policy.on_request(head, "127.0.0.1:1", None)
        best = min(
            timeit.repeat(
                lambda h=head: policy.on_request(h, "127.0.0.1:1", None),
                number=args.number,
                repeat=5,
            )
        )
        print(
            f"{label:24} {len(head):6} bytes  {type(verdict).__name__:8}"
            f" {best / args.number * 1e3:7.2f} ms"
        )


if __name__ == "__main__":
    main()
