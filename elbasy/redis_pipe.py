"""Sending quota steps to Redis without waiting: the loop never blocks on Redis.

Issue 14 asks that a reservation be sent from the loop without waiting for
the answer, that concurrent reservations share one round trip, and that the
held request wait for its answer on the loop. Two transports do that here,
with one interface, so they can be measured against each other
(bench/redis_store.py, numbers in bench/README.md):

:class:`SocketPipe`
    The loop's own non-blocking socket speaking RESP; replies parsed by
    hiredis. :meth:`~SocketPipe.send` appends a command to an output buffer
    (and writes what the socket takes at once); every command sent before the
    next :meth:`~SocketPipe.completed` goes in the same write: the pipelining
    is whatever the loop sent in one turn. The socket's fd is what the loop
    watches (readable: answers; :meth:`~SocketPipe.wants_write`: the kernel
    buffer was full, watch for writable and call :meth:`~SocketPipe.flush`).
    No thread, no lock, no copy through a queue.

:class:`ThreadPipe`
    A thread drains a queue into a redis-py pipeline (one round trip per
    batch: whatever queued while the previous batch was on the wire) and
    signals an eventfd, as elbasy/resolver.py does for DNS. Simple and
    reuses redis-py's connection handling, at the price of a thread switch
    and the GIL twice per batch.

Both answer through :meth:`completed`: (token, reply) pairs in the order
sent, the reply the script's bytes (read them with
:func:`elbasy.redis_store.answer`) or the exception that stopped it. A call
that met ``NOSCRIPT`` ran nothing: it is sent again (with the script's source
once, which loads it for every later ``EVALSHA``) and answered when that
answer comes.

:class:`SocketPipe` connects without blocking too: the connect (and for
``rediss://`` the TLS handshake) goes on while the first steps queue, AUTH
and SELECT are pipelined ahead of them (Redis runs a connection's commands
in order), and an AUTH or SELECT that fails answers every step behind it
with why. A host given by name is looked up when the pipe is made, unless
its owner found its address ahead (:func:`look_up`, off the loop).
Reconnecting is
its owner's (a lost connection answers every call in flight with the error,
and the pipe is then closed).
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

import hiredis

from elbasy.redis_store import SCRIPTS

__all__ = ["SocketPipe", "ThreadPipe", "Redirected", "Reply", "look_up"]

#: what a call is answered with: the script's reply, or why there is none
Reply = bytes | Exception
#: most commands one ThreadPipe batch (one redis-py pipeline) carries
MAX_BATCH = 512
_NOSCRIPT = "NOSCRIPT"


def _resp(*args: bytes | str) -> bytes:
    """One command in RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n" % len(b))
        out.append(b)
        out.append(b"\r\n")
    return b"".join(out)


#: Redis hosts' addresses found ahead, off the loop (:func:`look_up`): a pipe
#: made to one of them later connects without a lookup
_LOOKED_UP: dict[tuple[str, int], tuple[int, Any]] = {}


def look_up(host: str, port: int) -> None:
    """Find ``host``'s address now, for the pipes made to it later. It waits on
    the resolver: call it where waiting is allowed (a worker starting, a
    reconnect attempt's thread). Raises OSError when the name has no address."""
    family, _, _, _, target = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    _LOOKED_UP[(host, port)] = (family, target)


#: the token of AUTH and SELECT, sent ahead of every step: their answers are the pipe's
_HELLO = object()


#: the token of an ASKING sent ahead of a call an ASK redirected: its OK is the pipe's
_ASKING = object()
#: times one call follows MOVED or ASK before its answer is that error (a
#: cluster whose nodes disagree for longer is failing)
MAX_REDIRECTS = 5


class _Call:
    """One command in flight: a step (``name``: its script; EVALSHA) or a plain
    command (``args``), kept whole so it can be sent again (NOSCRIPT, or to the
    cluster node a MOVED or ASK names)."""

    __slots__ = ("token", "name", "sha", "keys", "blob", "more", "args", "retried", "asking",
                 "redirects")

    def __init__(
        self,
        token: object,
        name: str,
        sha: str,
        keys: Sequence[str],
        blob: bytes,
        more: tuple[bytes | str, ...] = (),
        args: tuple[bytes | str, ...] = (),
    ):
        self.token, self.name, self.sha, self.keys, self.blob = token, name, sha, keys, blob
        self.more, self.args = more, args
        self.retried = False  # sent again with its script's source after NOSCRIPT
        self.asking = False  # sent after ASKING (an ASK's node): so is its resend
        self.redirects = 0


class Redirected(Exception):
    """A Redis Cluster node's word that a call's slot is served by another node:
    ``MOVED`` (for good: the map of slots changed, a resharding or a failover)
    or ``ASK`` (this call only, while the slot migrates). The call is sent
    there (:meth:`SocketPipe.resend`) by the pipes' owner, who knows the nodes.
    """

    def __init__(self, reply: str, call: _Call, default_host: str) -> None:
        super().__init__(reply)
        kind, slot, where = reply.split(" ", 2)  # "MOVED 3999 127.0.0.1:6381"
        host, _, port = where.rpartition(":")
        self.ask = kind == "ASK"
        self.slot = int(slot)
        # an empty host: the node that answered, at another port (Redis 7)
        self.host = host or default_host
        self.port = int(port)
        self.call = call

    @property
    def node(self) -> str:
        """The node's name as redis-py's map of slots spells it (host:port)."""
        return f"{self.host}:{self.port}"


def _redirect_of(reply: Reply) -> str:
    """``MOVED``/``ASK`` when a reply is that redirection, else ""."""
    if isinstance(reply, hiredis.ReplyError):
        text = str(reply)
        if text.startswith("MOVED ") or text.startswith("ASK "):
            return text
    return ""


class SocketPipe:
    """Quota steps over the loop's own non-blocking socket (module docstring)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6379,
        *,
        db: int = 0,
        password: str | None = None,
        username: str | None = None,
        timeout: float = 0.5,
        path: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``path``: a unix socket instead of host and port; ``tls``: speak TLS
        (``rediss://``), the server's name checked as ``tls`` says. Returns at
        once, the connect on its way (``timeout`` is its owner's: a step not
        answered in time is the owner's to answer). Raises OSError when the
        connect fails at once (no such socket file, a name with no address)."""
        sock: socket.socket
        if path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: Any = path
        else:
            known = _LOOKED_UP.get((host, port))
            if known is not None:
                family, target = known
            else:  # not found ahead: looked up here (an address is not a lookup)
                family, _, _, _, target = socket.getaddrinfo(
                    host, port, type=socket.SOCK_STREAM
                )[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        err = sock.connect_ex(target)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            raise ConnectionError(
                f"cannot connect to Redis at {path or target}: {os.strerror(err)}"
            )
        self.sock = sock
        self.address: tuple[str, int] | str = path or (host, port)
        self._tls = tls
        self._server_name = host
        #: the connect (or the TLS handshake) is still on its way
        self.connecting = True
        self._reader = hiredis.Reader()
        self._out = bytearray()
        self._fifo: deque[_Call] = deque()
        self._lost_calls: list[tuple[object, Reply]] = []
        self._shas = {name: _sha(src) for name, src in SCRIPTS.items()}
        self.round_trips = 0  # writes that carried commands
        self.reloads = 0
        self.redirects = 0  # calls a cluster node answered MOVED or ASK
        self.closed: Exception | None = None
        if password:
            auth = ("AUTH", username, password) if username else ("AUTH", password)
            self._fifo.append(_Call(_HELLO, "AUTH", "", (), b""))
            self._out += _resp(*auth)
        if db:
            self._fifo.append(_Call(_HELLO, "SELECT", "", (), b""))
            self._out += _resp("SELECT", str(db))
        if not self._connected() and self.closed is not None:
            raise self.closed  # refused inside connect() (loopback, a local firewall)

    def _connected(self) -> bool:
        """Move the connect (then the TLS handshake) on; True once the pipe is ready.
        A failure closes the pipe (every call in flight answered with it)."""
        if not self.connecting:
            return True
        if self.closed is not None:
            return False
        if not isinstance(self.sock, ssl.SSLSocket):
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._lost(ConnectionError(f"cannot connect to Redis: {os.strerror(err)}"))
                return False
            try:
                self.sock.getpeername()
            except OSError:  # ENOTCONN: the handshake is on its way
                return False
            if self._tls is not None:
                self.sock = self._tls.wrap_socket(
                    self.sock, server_hostname=self._server_name, do_handshake_on_connect=False
                )
        if isinstance(self.sock, ssl.SSLSocket):
            try:
                self.sock.do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return False
            except OSError as exc:
                self._lost(exc)
                return False
        self.connecting = False
        return True

    def fileno(self) -> int:
        return self.sock.fileno()

    def _decrypted_waiting(self) -> bool:
        """TLS bytes read from the kernel and not yet taken (epoll cannot see them)."""
        return isinstance(self.sock, ssl.SSLSocket) and self.sock.pending() > 0

    def pending(self) -> int:
        """Calls sent and not answered yet."""
        return len(self._fifo)

    def send(
        self, token: object, name: str, keys: Sequence[str], blob: bytes, *more: bytes | str
    ) -> None:
        """Queue one step (EVALSHA, its ARGV ``blob`` and ``more``); written at the
        next :meth:`flush`. Never blocks."""
        if self.closed is not None:
            raise ConnectionError(f"the Redis pipe is closed: {self.closed}")
        call = _Call(token, name, self._shas[name], keys, blob, more)
        self._fifo.append(call)
        self._out += _resp("EVALSHA", call.sha, str(len(keys)), *keys, blob, *more)

    def command(self, token: object, *args: bytes | str) -> None:
        """Queue one plain command (PUBLISH, GET), answered in turn like a step."""
        if self.closed is not None:
            raise ConnectionError(f"the Redis pipe is closed: {self.closed}")
        self._fifo.append(_Call(token, "", "", (), b"", args=args))
        self._out += _resp(*args)

    def resend(self, call: _Call, asking: bool) -> None:
        """Send a call another node redirected here (:class:`Redirected`): after
        ASKING for an ASK. Written at the next :meth:`flush`. Never blocks."""
        if self.closed is not None:
            raise ConnectionError(f"the Redis pipe is closed: {self.closed}")
        call.redirects += 1
        call.asking = asking
        call.retried = False  # this node may not have the script yet
        self._queue(call)

    def _queue(self, call: _Call, source: bool = False) -> None:
        """Queue ``call`` (after ASKING when it is an ASK's), as EVALSHA, or with
        its script's ``source`` as EVAL, or as its plain command."""
        if call.asking:
            self._fifo.append(_Call(_ASKING, "", "", (), b""))
            self._out += _resp("ASKING")
        self._fifo.append(call)
        if not call.name:
            self._out += _resp(*call.args)
            return
        n = str(len(call.keys))
        if source:
            self._out += _resp("EVAL", SCRIPTS[call.name], n, *call.keys, call.blob, *call.more)
        else:
            self._out += _resp("EVALSHA", call.sha, n, *call.keys, call.blob, *call.more)

    def wants_write(self) -> bool:
        """Bytes the kernel did not take yet, or a connect on its way: watch the fd
        for writable, then flush()."""
        return self.closed is None and (bool(self._out) or self.connecting)

    def flush(self) -> None:
        """Write what the socket takes now (every step sent since: one round trip)."""
        if self.closed is not None or not self._connected() or not self._out:
            return
        self.round_trips += 1
        try:
            n = self.sock.send(self._out)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError as exc:
            self._lost(exc)
            return
        del self._out[:n]

    def completed(self) -> list[tuple[object, Reply]]:
        """Answers that came (call when the fd is readable). Never blocks."""
        out, self._lost_calls = self._lost_calls, []
        if self.closed is not None:
            return out
        if not self._connected():
            return out + self._take_lost()
        while True:
            try:
                data = self.sock.recv(262144)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except OSError as exc:
                self._lost(exc)
                return out + self._take_lost()
            if not data:
                self._lost(ConnectionError("Redis closed the connection"))
                return out + self._take_lost()
            self._reader.feed(data)
            if len(data) < 262144 and not self._decrypted_waiting():
                break
        while True:
            reply = self._reader.gets()
            if reply is False:
                break
            call = self._fifo.popleft()
            if call.token is _HELLO:
                if isinstance(reply, Exception):
                    self._lost(ConnectionError(f"Redis refused {call.name}: {reply}"))
                    return out + self._take_lost()
                continue
            if call.token is _ASKING:
                continue  # its OK; the call behind it answers
            if (
                isinstance(reply, hiredis.ReplyError)
                and str(reply).startswith(_NOSCRIPT)
                and call.name
                and not call.retried
            ):
                # ran nothing: again, with the source (which loads it for later calls)
                self.reloads += 1
                call.retried = True
                self._queue(call, source=True)
                continue
            redirect = _redirect_of(reply)
            if redirect and call.redirects < MAX_REDIRECTS:
                # ran nothing here: the owner sends it to the node named
                self.redirects += 1
                reply = Redirected(redirect, call, self._server_name)
            out.append((call.token, reply))
        if self._out:
            self.flush()
        return out

    def _lost(self, exc: Exception) -> None:
        """The connection is gone: every call in flight is answered with why."""
        self.closed = exc
        self._lost_calls += [(call.token, exc) for call in self._fifo if call.token is not _HELLO]
        self._fifo.clear()
        self._out.clear()
        self.sock.close()

    def _take_lost(self) -> list[tuple[object, Reply]]:
        out, self._lost_calls = self._lost_calls, []
        return out

    def abandon(self, exc: Exception) -> None:
        """Give the connection up (its server is no longer the one to ask): every
        call in flight is answered with ``exc`` at the next :meth:`completed`."""
        if self.closed is None:
            self._lost(exc)

    def close(self) -> None:
        if self.closed is None:
            self.closed = ConnectionError("closed")
            self.sock.close()


class ThreadPipe:
    """Quota steps through a thread that pipelines them with redis-py (module docstring)."""

    def __init__(self, client: Any, max_batch: int = MAX_BATCH) -> None:
        self.client = client
        self.max_batch = max_batch
        self._shas = {name: _sha(src) for name, src in SCRIPTS.items()}
        self._queue: deque[_Call] = deque()
        self._done: deque[tuple[object, Reply]] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.round_trips = 0
        self.reloads = 0
        self._thread = threading.Thread(target=self._run, name="elbasy-redis", daemon=True)
        self._thread.start()

    def fileno(self) -> int:
        return self._efd

    def send(self, token: object, name: str, keys: Sequence[str], blob: bytes) -> None:
        """Queue one step; the thread sends it with whatever else queued. Never blocks
        (beyond the queue's lock)."""
        with self._cv:
            self._queue.append(_Call(token, name, self._shas[name], keys, blob))
            self._cv.notify()

    def wants_write(self) -> bool:
        return False

    def flush(self) -> None:
        """Nothing to do: the thread writes."""

    def completed(self) -> list[tuple[object, Reply]]:
        """Answers that came (call when the eventfd is readable). Never blocks."""
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        out: list[tuple[object, Reply]] = []
        while self._done:
            out.append(self._done.popleft())
        return out

    def _run(self) -> None:
        from redis.exceptions import NoScriptError

        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                take = min(self.max_batch, len(self._queue))
                batch = [self._queue.popleft() for _ in range(take)]
            answers: list[Reply]
            try:
                answers = self._execute(batch)
                again = [k for k, a in enumerate(answers) if isinstance(a, NoScriptError)]
                if again:
                    self.reloads += len(again)
                    for name in {batch[k].name for k in again}:
                        self.client.script_load(SCRIPTS[name])
                    for k, a in zip(again, self._execute([batch[k] for k in again]), strict=True):
                        answers[k] = a
            except Exception as exc:  # the loop must hear back whatever happens
                answers = [exc] * len(batch)
            self._done.extend((call.token, a) for call, a in zip(batch, answers, strict=True))
            os.eventfd_write(self._efd, 1)

    def _execute(self, batch: list[_Call]) -> list[Reply]:
        pipe = self.client.pipeline(transaction=False)
        for call in batch:
            pipe.execute_command("EVALSHA", call.sha, len(call.keys), *call.keys, call.blob)
        self.round_trips += 1
        return list(pipe.execute(raise_on_error=False))

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(5)
        os.close(self._efd)


def _sha(src: str) -> str:
    from hashlib import sha1

    return sha1(src.encode()).hexdigest()
