"""A DNS server on loopback for elbasy's resolver, and a way to point elbasy at it.

elbasy resolves with the C library's ``getaddrinfo`` (``elbasy/resolver.py``),
which reads its nameserver from ``/etc/resolv.conf``. :func:`resolving_through`
is the command prefix that starts elbasy in a mount namespace of its own
(``unshare -m``) with a ``resolv.conf`` naming this server bind-mounted over
the system's: only that process tree sees it; the network is the test's.

The server listens on UDP port 53 of an address of its own in 127/8 (a port
cannot be given in ``resolv.conf``), answers names under ``ok_suffix`` with
an A record (``answer``) and an empty AAAA answer, and never answers names
under ``hang_suffix``: their lookups wait the whole ``timeout`` the file sets
(``resolver_timeout``). Anything else gets NXDOMAIN. Counts what it was asked.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
from collections import Counter
from pathlib import Path

A, AAAA = 1, 28


def _question(packet: bytes) -> tuple[str, int, int]:
    """(name, qtype, offset past the question) of a query."""
    labels, i = [], 12
    while packet[i]:
        n = packet[i]
        labels.append(packet[i + 1 : i + 1 + n].decode("ascii", "replace"))
        i += 1 + n
    qtype = struct.unpack("!H", packet[i + 1 : i + 3])[0]
    return ".".join(labels).lower(), qtype, i + 5


class DNSStub:
    def __init__(
        self,
        ok_suffix: str = ".ok.test",
        hang_suffix: str = ".hang.test",
        answer: str = "127.0.0.1",
        resolver_timeout: int = 30,
    ) -> None:
        """``resolver_timeout``: how long getaddrinfo waits for an answer (resolv.conf)."""
        self.ok_suffix, self.hang_suffix, self.answer = ok_suffix, hang_suffix, answer
        self.asked: Counter[str] = Counter()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(50):
            self.address = f"127.53.{random.randrange(1, 255)}.{random.randrange(1, 255)}"
            try:
                self.sock.bind((self.address, 53))
                break
            except OSError:
                continue
        else:
            self.sock.close()
            raise OSError("no free 127.53.x.y:53 for the DNS stub")
        self.dir = Path(tempfile.mkdtemp(prefix="elbasy-dns-"))
        self.resolv_conf = self.dir / "resolv.conf"
        self.resolv_conf.write_text(
            f"nameserver {self.address}\noptions timeout:{resolver_timeout} attempts:1\n",
            encoding="ascii",
        )
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                packet, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            try:
                name, qtype, end = _question(packet)
            except (IndexError, struct.error):
                continue
            self.asked[name] += 1
            if name.endswith(self.hang_suffix):
                continue  # never a word
            flags = 0x8180  # a response, recursion desired and available, NOERROR
            answers = b""
            if name.endswith(self.ok_suffix):
                if qtype == A:
                    rdata = socket.inet_aton(self.answer)
                    answers = b"\xc0\x0c" + struct.pack("!HHIH", A, 1, 60, 4) + rdata
            else:
                flags |= 3  # NXDOMAIN
            head = packet[:2] + struct.pack("!HHHHH", flags, 1, 1 if answers else 0, 0, 0)
            try:
                self.sock.sendto(head + packet[12:end] + answers, peer)
            except OSError:
                pass

    def prefix(self) -> tuple[str, ...]:
        """The command that runs what follows it resolving through this server."""
        script = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
        return (
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            str(self.resolv_conf),
        )

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def namespaces_work() -> str | None:
    """None when ``unshare -m`` and a bind mount work here; else why not."""
    if shutil.which("unshare") is None:
        return "no unshare(1)"
    if os.geteuid() != 0:
        return "unshare -m and mount need root"
    probe = subprocess.run(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount --bind /etc/resolv.conf /etc/resolv.conf",
        ],
        capture_output=True,
        timeout=10,
        check=False,
    )
    if probe.returncode:
        return "unshare -m: " + probe.stderr.decode(errors="replace").strip()
    return None
