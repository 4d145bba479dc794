"""--splice auto|always|never: how CONNECT tunnels move bytes, seen through /healthz counters.

``never`` copies every byte with recv/send, ``always`` splices every byte through a kernel pipe,
``auto`` copies until one read fills the 64 KiB buffer and splices that direction from then on.
Each test checks that the bytes arrive intact and that the counters say which path carried them.
"""

from __future__ import annotations

import hashlib
import socket

import origins
import pytest
from origins import connect_tunnel

MiB = 1 << 20
MODES = ("auto", "always", "never")

SMALL_UP = b"ping:" + bytes(range(256)) + b"q" * 39  # 300 bytes
SMALL_DOWN = b"pong:" + bytes(range(255, -1, -1)) * 2 + b"z" * 83  # 600 bytes


def _counters(p) -> tuple[int, int]:
    h = p.healthz()
    return h["bytes_spliced"], h["bytes_copied"]


def _small_echo_handler(sock: socket.socket, origin: origins.RawOrigin) -> None:
    """Read exactly len(SMALL_UP) bytes, answer SMALL_DOWN, keep the connection open until EOF."""
    got = b""
    while len(got) < len(SMALL_UP):
        data = sock.recv(4096)
        if not data:
            break
        got += data
    origin.event("request", got)
    sock.sendall(SMALL_DOWN)
    while sock.recv(4096):
        pass
    origin.event("eof")


def _small_exchange(p, origin: origins.RawOrigin) -> None:
    s, resp, reader = connect_tunnel(p, origin.hostport)
    with s:
        assert resp.status == 200, resp
        s.settimeout(10)
        s.sendall(SMALL_UP)
        reply = reader.read_exact(len(SMALL_DOWN))
        assert reply == SMALL_DOWN
        assert origin.wait_event("request") == SMALL_UP
        s.shutdown(socket.SHUT_WR)
        assert reader.read_to_eof() == b""
    origin.wait_event("eof")


def _download_handler(n: int):
    def handler(sock: socket.socket, origin: origins.RawOrigin) -> None:
        for piece in origins.pattern_chunks(n):
            sock.sendall(piece)
        origin.event("sent", n)

    return handler


def _download(p, origin: origins.RawOrigin, n: int) -> None:
    s, resp, reader = connect_tunnel(p, origin.hostport)
    with s:
        assert resp.status == 200, resp
        s.settimeout(15)
        h = hashlib.sha256()
        total = 0
        if reader.buf:
            h.update(bytes(reader.buf))
            total += len(reader.buf)
            reader.buf.clear()
        while True:
            data = s.recv(256 * 1024)
            if not data:
                break
            h.update(data)
            total += len(data)
    assert total == n, f"received {total} of {n} bytes"
    assert h.hexdigest() == origins.pattern_sha256(n), "download corrupted in the tunnel"


def test_never_copies_a_bulk_download(proxy, raw_origin):
    n = 12 * MiB
    origin = raw_origin(_download_handler(n))
    p = proxy("--splice", "never")
    spliced0, copied0 = _counters(p)
    _download(p, origin, n)
    spliced, copied = _counters(p)
    assert spliced == spliced0 == 0, f"--splice never spliced {spliced} bytes"
    assert copied - copied0 == n, f"bytes_copied grew by {copied - copied0}, expected {n}"
    assert p.healthz()["bytes_down"] == n


def test_always_splices_a_small_exchange(proxy, raw_origin):
    origin = raw_origin(_small_echo_handler)
    p = proxy("--splice", "always")
    spliced0, copied0 = _counters(p)
    _small_exchange(p, origin)
    spliced, copied = _counters(p)
    moved = len(SMALL_UP) + len(SMALL_DOWN)
    assert spliced - spliced0 == moved, (
        f"--splice always: bytes_spliced grew by {spliced - spliced0}, expected {moved}"
    )
    assert copied == copied0, f"--splice always copied {copied - copied0} bytes"


def test_auto_copies_a_small_exchange(proxy, raw_origin):
    origin = raw_origin(_small_echo_handler)
    p = proxy("--splice", "auto")
    spliced0, copied0 = _counters(p)
    _small_exchange(p, origin)
    spliced, copied = _counters(p)
    moved = len(SMALL_UP) + len(SMALL_DOWN)
    assert spliced == spliced0 == 0, f"--splice auto spliced {spliced} bytes of a small exchange"
    assert copied - copied0 == moved, f"bytes_copied grew by {copied - copied0}, expected {moved}"


def test_auto_is_the_default_and_splices_a_bulk_download(proxy, raw_origin):
    n = 16 * MiB
    origin = raw_origin(_download_handler(n))
    p = proxy()  # no --splice: auto
    _download(p, origin, n)
    spliced, copied = _counters(p)
    assert spliced + copied == n, f"spliced {spliced} + copied {copied} != {n}"
    # the copy path only carries bytes until one read fills the 64 KiB buffer
    assert spliced >= n - 2 * MiB, f"only {spliced} of {n} bytes went through splice(2)"


def test_auto_splices_bulk_both_ways(proxy, raw_origin):
    n_up = 8 * MiB
    n_down = 8 * MiB

    def handler(sock: socket.socket, origin: origins.RawOrigin) -> None:
        h = hashlib.sha256()
        total = 0
        while data := sock.recv(256 * 1024):
            h.update(data)
            total += len(data)
        sock.sendall(f"{total} {h.hexdigest()}\n".encode())
        for piece in origins.pattern_chunks(n_down):
            sock.sendall(piece)

    origin = raw_origin(handler)
    p = proxy("--splice", "auto")
    s, resp, reader = connect_tunnel(p, origin.hostport)
    with s:
        assert resp.status == 200, resp
        s.settimeout(15)
        for piece in origins.pattern_chunks(n_up):
            s.sendall(piece)
        s.shutdown(socket.SHUT_WR)
        data = reader.read_to_eof()
    line, _, body = data.partition(b"\n")
    assert line == f"{n_up} {origins.pattern_sha256(n_up)}".encode(), line
    assert len(body) == n_down
    assert hashlib.sha256(body).hexdigest() == origins.pattern_sha256(n_down)
    h = p.healthz()
    total = n_up + len(line) + 1 + n_down
    assert h["bytes_spliced"] + h["bytes_copied"] == total, h
    assert h["bytes_spliced"] >= total - 4 * MiB, (
        f"only {h['bytes_spliced']} of {total} bytes went through splice(2): {h}"
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [200, 3 * MiB], ids=["small", "bulk"])
def test_half_close_in_every_mode(proxy, raw_origin, mode, size):
    """Client sends, shuts down its write side, still gets the full reply; counters match mode."""
    origin = raw_origin(origins.handler_read_to_eof_then_reply)
    p = proxy("--splice", mode)
    payload = b"".join(origins.pattern_chunks(size))
    s, resp, reader = connect_tunnel(p, origin.hostport)
    with s:
        assert resp.status == 200, resp
        s.settimeout(10)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        reply = reader.read_to_eof()
    assert origin.wait_event("eof") == size, "origin did not see the client's EOF"
    expected = f"got {size} bytes sha256={hashlib.sha256(payload).hexdigest()}\n".encode()
    expected += b"tail" * 1000
    assert reply == expected
    h = p.healthz()
    moved = size + len(expected)
    assert h["bytes_up"] == size and h["bytes_down"] == len(expected), h
    assert h["bytes_spliced"] + h["bytes_copied"] == moved, h
    if mode == "never":
        assert h["bytes_spliced"] == 0, h
    elif mode == "always":
        assert h["bytes_copied"] == 0, h
    elif size < 65536:
        assert h["bytes_spliced"] == 0, h  # auto, nothing filled a read
    else:
        assert h["bytes_spliced"] >= size - 2 * MiB, h  # auto, the upload turned bulk


# ---------------------------------------------------------------------------------------------
# a kernel (or socket type) that refuses splice(2): the tunnel copies instead of failing

_REFUSING_SPLICE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

/* splice(2) as a kernel without it would answer, for the calls the test names:
 * ELBASY_TEST_SPLICE=all refuses every call; =drain refuses only pipe -> socket,
 * after bytes are already in the pipe. */
ssize_t splice(int fd_in, loff_t *off_in, int fd_out, loff_t *off_out, size_t len,
               unsigned int flags)
{
    const char *mode = getenv("ELBASY_TEST_SPLICE");
    struct stat st;
    int from_pipe = fstat(fd_in, &st) == 0 && S_ISFIFO(st.st_mode);
    if (mode && (strcmp(mode, "all") == 0 || (strcmp(mode, "drain") == 0 && from_pipe))) {
        errno = EINVAL;
        return -1;
    }
    return syscall(SYS_splice, fd_in, off_in, fd_out, off_out, len, flags);
}
"""


@pytest.fixture(scope="module")
def refusing_splice(tmp_path_factory) -> str:
    """A shared object that makes splice(2) fail with EINVAL, loaded with LD_PRELOAD."""
    import subprocess

    where = tmp_path_factory.mktemp("splice-shim")
    src = where / "refuse_splice.c"
    src.write_text(_REFUSING_SPLICE)
    lib = where / "refuse_splice.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", str(lib), str(src)], check=True)
    return str(lib)


@pytest.mark.parametrize("which", ["all", "drain"])
def test_splice_refused_falls_back_to_copying(proxy, raw_origin, refusing_splice, which):
    """EINVAL from splice(2), before or after bytes entered the pipe: the download arrives
    whole, by copy, and the fallback is counted."""
    n = 24 * MiB
    origin = raw_origin(_download_handler(n))
    env = {"LD_PRELOAD": refusing_splice, "ELBASY_TEST_SPLICE": which}
    p = proxy("--splice", "always", env=env)
    _download(p, origin, n)
    h = p.healthz()
    assert h["counters"]["splice_fallbacks"] >= 1, h["counters"]
    assert h["counters"]["client_aborts"] == 0 and h["counters"]["upstream_aborts"] == 0
    if which == "all":
        assert h["bytes_spliced"] == 0, h
    assert h["bytes_copied"] >= n, h
    assert h["live"]["pipes"] == h["live"]["pipes_pooled"], h["live"]
