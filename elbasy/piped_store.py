"""The quota store of a fleet as the loop uses it: Redis, never waited on.

``--quota-store redis://...`` gives each worker one :class:`PipedStore`: a
:class:`~elbasy.quota.PipedQuotaStore` over a
:class:`~elbasy.fleet_store.FleetStore` (the shared store, its local share
and the rules of falling back between them). What it adds is the way steps
reach Redis: over the worker's own non-blocking socket
(:class:`~elbasy.redis_pipe.SocketPipe`), the same requests the blocking
:class:`~elbasy.redis_store.RedisStore` sends, read the same way.

* **The three steps that decide a departure** (reserve, confirm, earliest)
  are sent and answered later: ``*_later`` returns :data:`~elbasy.quota.LATER`,
  and the pacer holds the request until :meth:`PipedStore.answers` gives the
  result (the store's fd is readable then). Every step sent before the answers
  come shares their round trip: the socket carries them one after another and
  one read brings back all that are done (bench/README.md: 2.5–4× the
  reservations per second of one round trip each).
* **The steps that only tell** (landed, give_back, settle, observe, throttled
  and the PUBLISH of a refund) are sent and never waited for; an error in
  their answer counts as Redis failing.
* **Bounded wait.** A step not answered within ``timeout`` seconds
  (``--quota-redis-timeout``) is answered by the fleet store, which falls
  back to the local share then (:meth:`PipedStore.late`, called by the pacer
  when a held request's net timer finds its answer overdue). A lost
  connection does the same at once, for every step in flight.
* **One fd.** The loop watches one quota fd; this store's is an epoll fd of
  its own that is readable when the pipe's socket is (answers) or the local
  share's fd is (another worker's refund, or another machine's, which
  elbasy.redis_moves signals there).

Learned facts (plans, tiers, query shapes' costs) are read the same way: the
generation counter every ``facts_refresh`` s and a fact not cached are GETs
on the pipe; until the answer comes a fact is the machine's own word (its
local share's, which learns every fact this machine is told), and the
counter moves when Redis's answer differs, so the pacer reads its limits
again.

Making a pipe does not wait either: the connect, AUTH, SELECT and the TLS
handshake go on without blocking, the first steps queued behind them (a
connect that hangs is a step not answered within ``timeout``), and what a
pipe needs first is found off the loop (:func:`found_ahead`: Redis's host
name looked up, a Sentinel's master asked for) while the worker starts, by
each reconnect attempt on its thread (``FleetStore.after_attempt``) and by
the master watch after a failover. Said plainly, the one wait left on the
loop is the lookup of a name that could not be found ahead (the resolver
failing as the worker started, a cluster node first named by a MOVED).
While Redis is down the fleet store's reconnect attempts run on a thread.
The second reservation of an idempotent request sent again after a 429 goes
over the pipe too, answered later like the first.
The pipe speaks as the URL says: TCP, TLS (``rediss://``, with its
``ssl_*`` options) or a unix socket. A ``redis+cluster://`` store has a pipe
per node, each step sent to the node of its account's slot (redis-py's
map of slots). A node that answers MOVED (a resharding moved the slot, or a
failover its master) has the call sent on to the node named, and the slot
moved in the map so the account's next steps go there; an ASK (the slot
migrating) sends that call on after ASKING. Neither counts as Redis failing
(``redirects`` in the stats). A node that cannot be reached, a call
redirected more than ``MAX_REDIRECTS`` times, or a TRYAGAIN (a migration
that has moved some of one account's keys and not the others yet, which
only a rule with more than one limit can meet) does: the local share answers
until the backoff's reconnect, which reads the map again.
"""

from __future__ import annotations

import logging
import os
import select
import ssl
import threading
from collections.abc import Callable, Sequence
from typing import Any

from elbasy.fleet_store import FleetStore
from elbasy.limits import Limit, ServerView
from elbasy.quota import (
    CONFIRM,
    EARLIEST,
    LATER,
    RESERVE,
    LateAnswer,
    Later,
    LevelSeen,
    Reservation,
    Shed,
    StoreFull,
    _per_limit,
)
from elbasy.redis_pipe import Redirected, Reply, SocketPipe, look_up
from elbasy.redis_store import RedisStore, Step, answer, levels_seen

__all__ = ["PipedStore", "pipe_to"]

log = logging.getLogger("elbasy.quota")


class _Ask:
    """A step whose answer someone waits for."""

    __slots__ = ("kind", "token", "r", "keys", "limits", "costs", "now", "max_wait")

    def __init__(
        self,
        kind: str,
        token: object,
        r: Reservation | None,
        now: float,
        keys: Sequence[str] = (),
        limits: Sequence[Limit] = (),
        costs: tuple[float, ...] = (),
        max_wait: float = 0.0,
    ) -> None:
        self.kind, self.token, self.r, self.now = kind, token, r, now
        self.keys, self.limits, self.costs, self.max_wait = keys, limits, costs, max_wait


class _Put:
    """A fact sent to Redis: its answer says whether the counter moved."""

    __slots__ = ("name", "args")

    def __init__(self, name: str, args: tuple[bytes, str]) -> None:
        self.name, self.args = name, args


class _Read:
    """A GET of the facts' generation counter (``name`` "") or of one fact."""

    __slots__ = ("name", "generation")

    def __init__(self, name: str, generation: int) -> None:
        self.name, self.generation = name, generation


class _Seen:
    """An observe step whose answer carries the store's levels for /metrics' drift."""

    __slots__ = ("seen",)

    def __init__(self, seen: LevelSeen) -> None:
        self.seen = seen


#: which server a step goes to: "" (the one server, or a Sentinel's master)
#: or a cluster node's name ("host:port")
Node = str


def node_of(redis: RedisStore, key: str | None) -> Node:
    """The server of a Redis key, without asking anyone: a cluster's node for
    its slot (redis-py's map of slots), else the one server."""
    client = redis.client
    if getattr(client, "connection_pool", None) is not None:
        return ""
    node = client.get_node_from_key(key) if key else client.get_default_node()
    return str(node.name)


def found_ahead(redis: RedisStore) -> tuple[str, int] | None:
    """Find now what making a pipe to ``redis``'s servers would otherwise wait
    for on the loop: each host name's address (elbasy.redis_pipe.look_up)
    and a Sentinel's master, which is returned (None for another kind of
    store). It waits: call it where waiting is allowed (a worker starting, a
    reconnect attempt's thread). Raises what the lookup or the Sentinels
    raise."""
    client = redis.client
    pool = getattr(client, "connection_pool", None)
    if pool is None:  # a cluster: its nodes as the map names them
        for server in client.get_nodes():
            look_up(server.host, int(server.port))
        return None
    if hasattr(pool, "get_master_address"):
        host, port = pool.get_master_address()
        look_up(host, int(port))
        return host, int(port)
    kwargs = pool.connection_kwargs
    if not kwargs.get("path"):
        look_up(kwargs.get("host") or "127.0.0.1", int(kwargs.get("port") or 6379))
    return None


def pipe_to(
    redis: RedisStore, node: Node, timeout: float, master: tuple[str, int] | None = None
) -> SocketPipe:
    """A SocketPipe to ``node`` of ``redis``'s client (a Sentinel's master: at
    ``master``, found ahead, else where the Sentinels say it is now), over
    TCP, TLS or a unix socket as the client's. Raises OSError when the server
    cannot be reached."""
    client = redis.client
    pool = getattr(client, "connection_pool", None)
    if pool is None:  # a cluster node
        server = client.get_node(node_name=node)
        if server is not None and server.redis_connection is not None:
            pool = server.redis_connection.connection_pool
            host, port = server.host, server.port
        else:
            # a node the map learned of from a MOVED: reached as the others are
            known = next((n for n in client.get_nodes() if n.redis_connection is not None), None)
            if known is None:
                raise ConnectionError(f"no Redis Cluster node {node}")
            pool = known.redis_connection.connection_pool
            host, _, port = node.rpartition(":")
    elif hasattr(pool, "get_master_address"):
        # it moves on a failover; asked here only when not found ahead
        host, port = master if master is not None else pool.get_master_address()
    else:
        host, port = pool.connection_kwargs.get("host"), pool.connection_kwargs.get("port")
    kwargs = pool.connection_kwargs
    return SocketPipe(
        host or "127.0.0.1",
        int(port or 6379),
        db=int(kwargs.get("db") or 0),
        password=kwargs.get("password"),
        username=kwargs.get("username"),
        timeout=timeout,
        path=kwargs.get("path"),
        tls=tls_of(pool),
    )


def tls_of(pool: Any) -> ssl.SSLContext | None:
    """The TLS settings of a redis-py pool's connections (``rediss://`` and its
    ``ssl_*`` query options) as a context for the pipe, or None: plain."""
    from redis.connection import SSLConnection

    if not issubclass(pool.connection_class, SSLConnection):
        return None
    kwargs = pool.connection_kwargs
    ctx = ssl.create_default_context(cafile=kwargs.get("ssl_ca_certs"))
    if kwargs.get("ssl_certfile"):
        ctx.load_cert_chain(kwargs["ssl_certfile"], kwargs.get("ssl_keyfile"))
    reqs = kwargs.get("ssl_cert_reqs", "required")
    if reqs in ("none", ssl.CERT_NONE):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.check_hostname = bool(kwargs.get("ssl_check_hostname", False))
    return ctx


class MasterWatch(threading.Thread):
    """Asks the Sentinels every ``every`` seconds where a master is; when it is
    no longer where a pipe was made (a failover), signals ``fd`` (an eventfd)
    and sets :attr:`moved`. A demoted master may take writes for seconds
    before the Sentinels reconfigure it, and a pipe made before the failover
    would write there, apart from every other machine: this is what notices."""

    def __init__(self, pool: Any, at: tuple[str, int], fd: int, every: float = 1.0) -> None:
        super().__init__(name="elbasy-redis-master", daemon=True)
        self.pool, self.at, self.fd, self.every = pool, at, fd, every
        self.moved = False
        self.now_at: tuple[str, int] | None = None  # the new master, once moved
        self._stop_at = threading.Event()

    def run(self) -> None:
        while not self._stop_at.wait(self.every):
            try:
                host, port = self.pool.get_master_address()
                now_at = (host, int(port))
                if now_at != self.at:
                    look_up(*now_at)  # the new pipe connects without a lookup
            except Exception:  # noqa: BLE001 - no Sentinel answers: asked again
                continue
            if now_at != self.at:
                self.now_at = now_at
                self.moved = True
                os.eventfd_write(self.fd, 1)
                return

    def stop(self) -> None:
        self._stop_at.set()


class PipedStore:
    """A FleetStore whose steps reach Redis without waiting (the module docstring)."""

    piped = True

    def __init__(
        self,
        fleet: FleetStore,
        *,
        timeout: float,
        make_pipe: Callable[
            [RedisStore, Node, float, tuple[str, int] | None], SocketPipe
        ] = pipe_to,
    ) -> None:
        self.fleet = fleet
        # while Redis is down, its reconnect attempts run on a thread: no step
        # waits; each attempt Redis answered finds the addresses ahead there
        fleet.probe_aside = True
        fleet.after_attempt = self._find_ahead
        # a Sentinel's master as found ahead (at start, by a reconnect attempt,
        # by the master watch), so making a pipe does not ask the Sentinels
        self._master: tuple[str, int] | None = None
        if fleet.shared is not None:
            try:
                self._find_ahead(fleet.shared)  # the worker is starting: waiting is allowed
            except fleet.errors:
                pass  # unreachable now: the first pipe finds it, or a reconnect attempt
        self.timeout = timeout
        self._make_pipe = make_pipe
        # one pipe per server (one, or a cluster's nodes), with its fd number
        self._pipes: dict[Node, tuple[SocketPipe, int]] = {}
        self._pipes_of: Any = None  # the shared store they were made for
        self._stale_map = False  # a cluster's map of slots to read again
        self._stash: list[tuple[object, Reply]] = []  # a lost pipe's answers, for answers()
        # a Sentinel's master: watched on a thread for a failover
        self._watcher: MasterWatch | None = None
        self._moved_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # facts: the reads on their way, and what moves facts_generation
        self._reading: set[str] = set()
        self._news = 0
        self._gen_seen: tuple[int, ...] = ()
        self._generation = 0
        self._reloads = 0  # NOSCRIPT reloads and writes of pipes closed since
        self._writes = 0
        # sent, unanswered, oldest first (an ordered set: a step that met
        # NOSCRIPT is answered after steps sent behind it)
        self._asks: dict[_Ask, None] = {}
        self._epoll = select.epoll()
        self._watched: dict[int, int] = {}  # fd -> its epoll interest
        self._watch(fleet.fileno())
        self._watch(self._moved_fd)
        self.sent = 0  # steps sent on the pipe
        self.reads = 0  # facts read on the pipe
        self.late_answers = 0  # steps answered by the fleet store after the timeout
        self.lost_answers = 0  # steps answered by the fleet store after a lost connection
        self.pipes = 0  # pipes made
        self.redirects = 0  # calls sent on to the node a MOVED or ASK named

    # ------------------------------------------------------------------ the pipe

    def _watch(self, fd: int, write: bool = False) -> None:
        """Watch ``fd`` for answers, and (``write``) for room to write: a pipe
        whose connect is on its way, or whose steps the kernel did not all take."""
        mask = select.EPOLLIN | (select.EPOLLOUT if write else 0)
        if fd < 0 or self._watched.get(fd) == mask:
            return
        if fd in self._watched:
            self._epoll.modify(fd, mask)
        else:
            self._epoll.register(fd, mask)
        self._watched[fd] = mask

    def _unwatch(self, fd: int) -> None:
        if self._watched.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def _watch_pipes(self) -> None:
        """Each open pipe watched for writable only while it has something to write."""
        for pipe, fd in self._pipes.values():
            if pipe.closed is None:
                self._watch(fd, pipe.wants_write())

    def _pipe_now(
        self,
        *,
        new: bool = False,
        keys: Sequence[str] = (),
        limits: Sequence[Limit] = (),
        facts: bool = False,
    ) -> tuple[RedisStore, SocketPipe] | None:
        """The shared store and the pipe to the server of an account (``keys``,
        ``limits``: its first bucket's; ``facts``: the facts'; neither: any) when
        a step may go there now, else None (the fleet store answers: from the
        local share while Redis is down)."""
        shared = self.fleet.shared_now(new=new)
        if shared is None:
            return None
        assert isinstance(shared, RedisStore)
        if self._pipes_of is not shared:
            self._drop_pipes()
            self._pipes_of = shared
        try:
            key = None
            if facts:
                key = shared.fact_key("")
            elif keys and limits:
                key = shared.key_of(keys[0], limits[0].name)
            node = node_of(shared, key)
            got = self._pipes.get(node)
            if got is not None:
                if got[0].closed is None:
                    return shared, got[0]
                # lost while sending: its calls' answers (the error) are for the
                # loop's next turn, which the eventfd brings; Redis counts as down
                self._stash += got[0].completed()
                self._forget(node)
                os.eventfd_write(self._moved_fd, 1)
                self.fleet.fail(ConnectionError("the connection to Redis was lost"))
                return None
            if node and self._stale_map:
                # a cluster that failed may have moved its slots: read the map again
                shared.client.nodes_manager.initialize()
                self._stale_map = False
                node = node_of(shared, key)
            made = self._new_pipe(shared, node)
        except (OSError, ConnectionError) as exc:
            self.fleet.fail(exc)
            self._drop_pipes()
            return None
        return shared, made

    def _find_ahead(self, shared: Any) -> None:
        """Addresses and a Sentinel's master found off the loop (found_ahead)."""
        self._master = found_ahead(shared)

    def _new_pipe(self, shared: RedisStore, node: Node) -> SocketPipe:
        """A pipe to ``node``, watched. Raises OSError when it cannot be made."""
        made = self._make_pipe(shared, node, self.timeout, self._master)
        self.pipes += 1
        self._pipes[node] = (made, made.fileno())
        pool = getattr(shared.client, "connection_pool", None)
        if hasattr(pool, "get_master_address"):
            self._watch_master(pool, made)
        self._watch(made.fileno(), made.wants_write())
        # a worker that started with Redis down watches its moves from now on
        self._watch(self.fleet.fileno())
        return made

    def _follow(self, shared: RedisStore, moved: Redirected) -> bool:
        """Send a call a cluster node redirected to the node it names: a MOVED
        also moves the slot in redis-py's map, so the account's next steps go
        there at once; an ASK (the slot migrating) sends only this call, after
        ASKING. False when that node cannot be reached (Redis counts as
        failing, as for any lost answer)."""
        if not moved.ask:
            from redis.exceptions import MovedError

            shared.client.nodes_manager.move_slot(MovedError(f"{moved.slot} {moved.node}"))
        got = self._pipes.get(moved.node)
        try:
            if got is not None and got[0].closed is None:
                pipe = got[0]
            else:
                if got is not None:
                    self._forget(moved.node)
                pipe = self._new_pipe(shared, moved.node)
            pipe.resend(moved.call, asking=moved.ask)
        except (OSError, ConnectionError):
            return False
        pipe.flush()
        self.redirects += 1
        return True

    def _watch_master(self, pool: Any, pipe: SocketPipe) -> None:
        if self._watcher is not None:
            self._watcher.stop()
        where = pipe.address  # as the Sentinels named it (a TCP pipe)
        assert not isinstance(where, str), "a Sentinel's master is reached over TCP"
        self._watcher = MasterWatch(pool, (where[0], int(where[1])), self._moved_fd)
        self._watcher.start()

    def _forget(self, node: Node) -> None:
        pipe, fd = self._pipes.pop(node)
        self._reloads += pipe.reloads
        self._writes += pipe.round_trips
        if pipe.closed is None:
            self._unwatch(fd)
        else:
            # its socket is closed already, which took it out of the epoll set
            self._watched.pop(fd, None)
        pipe.close()

    def _drop_pipes(self) -> None:
        self._reading.clear()  # their answers will not come: read again when asked
        for node in list(self._pipes):
            self._forget(node)
        self._pipes_of = None

    def _send(self, pipe: SocketPipe, token: object, step: Step | None) -> None:
        """Send one step: written now when nothing is in flight, else with every
        step sent meanwhile as soon as the answers in flight come (one write,
        one round trip for all of them: the pipelining)."""
        if step is None:
            return
        idle = not pipe.pending()
        pipe.send(token, *step)
        if idle:
            pipe.flush()
        self.sent += 1

    def _ask(self, kind: str, pipe: SocketPipe, step: Step, ask: _Ask) -> Later:
        self._send(pipe, ask, step)
        self._asks[ask] = None
        return LATER

    # ------------------------------------------------------------------ the steps answered later

    def reserve_later(
        self,
        token: object,
        keys: Sequence[str],
        limits: Sequence[Limit],
        cost: float | Sequence[float],
        now: float,
        max_wait: float,
    ) -> Reservation | Shed | Later:
        costs = _per_limit(cost, limits)
        up = self._pipe_now(new=True, keys=keys, limits=limits) if limits else None
        if up is None:
            return self.fleet.reserve(keys, limits, costs, now, max_wait)
        shared, pipe = up
        step = shared.reserve_request(keys, limits, costs, now, max_wait)
        ask = _Ask(RESERVE, token, None, now, keys, limits, costs, max_wait)
        return self._ask(RESERVE, pipe, step, ask)

    def confirm_later(self, token: object, r: Reservation, now: float) -> float | None | Later:
        up = None if r.sent or r.fallback or not r.limits else self._at(r)
        if up is None:
            return self.fleet.confirm(r, now)
        shared, pipe = up
        return self._ask(
            CONFIRM, pipe, shared.confirm_request(r, now), self._asked(CONFIRM, token, r, now)
        )

    def earliest_later(self, token: object, r: Reservation, now: float) -> float | Later:
        up = None if r.sent or r.fallback or not r.limits else self._at(r)
        if up is None:
            return self.fleet.earliest(r, now)
        shared, pipe = up
        ask = self._asked(EARLIEST, token, r, now)
        return self._ask(EARLIEST, pipe, shared.earliest_request(r, now), ask)

    def _at(self, r: Reservation) -> tuple[RedisStore, SocketPipe] | None:
        return self._pipe_now(keys=r.keys, limits=r.limits)

    def _asked(self, kind: str, token: object, r: Reservation, now: float) -> _Ask:
        return _Ask(kind, token, r, now)

    def answers(self, now: float) -> list[LateAnswer]:
        shared = self._pipes_of
        try:
            os.eventfd_read(self._moved_fd)
        except BlockingIOError:
            pass
        watcher = self._watcher
        if watcher is not None and watcher.moved:
            self._watcher = None
            self._master = watcher.now_at  # where the next pipe goes
            for pipe, _ in self._pipes.values():
                pipe.abandon(ConnectionError("the Sentinels moved the master"))
        if not self._pipes and not self._stash:
            return []
        out: list[LateAnswer] = []
        failed: Exception | None = None
        unanswered: list[_Ask] = []
        came, self._stash = self._stash, []
        came += [answer for pipe, _ in self._pipes.values() for answer in pipe.completed()]
        for token, reply in came:
            if isinstance(reply, Redirected):
                if self._follow(shared, reply):
                    continue  # its answer comes from the node named
                reply = ConnectionError(f"cannot reach the Redis Cluster node {reply.node}")
            if isinstance(token, _Seen):
                if isinstance(reply, Exception):
                    failed = failed or reply
                else:
                    assert isinstance(reply, bytes)
                    levels_seen(answer(reply), token.seen)
            elif isinstance(token, _Read | _Put):
                if isinstance(reply, Exception):
                    failed = failed or reply
                elif isinstance(token, _Read):
                    self._read_came(shared, token, reply)
                else:
                    shared.put_fact_came(token.name, token.args, reply)
            elif isinstance(token, _Ask):
                ask = token
                del self._asks[ask]
                if isinstance(reply, Exception):
                    failed = failed or reply
                    unanswered.append(ask)
                else:
                    out.append((ask.token, ask.kind, self._read(shared, ask, reply)))
            elif isinstance(reply, Exception):
                failed = failed or reply  # a step that only told
        for pipe, _ in self._pipes.values():
            failed = failed or pipe.closed
        self._watch_pipes()
        if failed is not None:
            self._asks = {**dict.fromkeys(unanswered), **self._asks}
            self.lost_answers += len(self._asks)
            out += self._fail_over(failed, now)
        return out

    def late(self, now: float) -> list[LateAnswer]:
        # what came already first: a timer can fire in the turn its answer arrived
        out = self.answers(now)
        if not self._asks or now - next(iter(self._asks)).now < self.timeout:
            return out
        self.late_answers += len(self._asks)
        exc = TimeoutError(f"no answer from Redis within {self.timeout:g} s")
        return out + self._fail_over(exc, now)

    def _read(self, shared: RedisStore, ask: _Ask, reply: Reply) -> object:
        assert isinstance(reply, bytes)
        out = answer(reply)
        if ask.kind == RESERVE:
            return shared.reserved(out, ask.keys, ask.limits, ask.costs, ask.now)
        assert ask.r is not None
        if ask.kind == CONFIRM:
            return shared.confirmed(ask.r, out, ask.now)
        return shared.earliest_answer(out, ask.now)

    def _fail_over(self, exc: BaseException, now: float) -> list[LateAnswer]:
        """Redis failed (or is late): every step in flight is answered by the
        fleet store, which answers from the local share from now on."""
        self.fleet.fail(exc)
        self._drop_pipes()
        self._stale_map = True
        asks, self._asks = list(self._asks), {}
        out: list[LateAnswer] = []
        for ask in asks:
            got: object
            if ask.kind == RESERVE:
                try:
                    got = self.fleet.reserve(ask.keys, ask.limits, ask.costs, now, ask.max_wait)
                except StoreFull as full:
                    got = full
            else:
                assert ask.r is not None
                if ask.kind == CONFIRM:
                    got = self.fleet.confirm(ask.r, now)
                else:
                    got = self.fleet.earliest(ask.r, now)
            out.append((ask.token, ask.kind, got))
        return out

    # ------------------------------------------------------------------ the steps that only tell

    def _tell(
        self,
        keys: Sequence[str],
        limits: Sequence[Limit],
        step: Callable[[RedisStore], Step | None],
        r: Reservation | None = None,
        token: object = None,
    ) -> bool:
        """Send a step nobody waits for (its answer, if read, goes to ``token``);
        False when it cannot go on the pipe now."""
        if r is not None and r.fallback:
            return False
        up = self._pipe_now(keys=keys, limits=limits)
        if up is None:
            return False
        shared, pipe = up
        self._send(pipe, token, step(shared))
        return True

    def _announce(self, keys: Sequence[str]) -> None:
        up = self._pipe_now()
        if up is not None:
            shared, pipe = up
            channel, message = shared.announcement(keys)
            self._command(pipe, None, "PUBLISH", channel, message)

    def landed(self, r: Reservation, now: float) -> None:
        if not r.sent or r.landed:
            return
        if not self._tell(r.keys, r.limits, lambda s: s.landed_request(r, now), r):
            self.fleet.landed(r, now)

    def give_back(self, r: Reservation, now: float) -> bool:
        if r.sent or r.returned:
            return False
        if not self._tell(r.keys, r.limits, lambda s: s.give_back_request(r, now), r):
            return self.fleet.give_back(r, now)
        if r.limits:
            self._announce(r.keys)
        return True

    def settle(self, r: Reservation, actual: float | Sequence[float], now: float) -> None:
        if not r.sent or not r.limits:
            return
        up = None if r.fallback else self._at(r)
        if up is None:
            self.fleet.settle(r, actual, now)
            return
        shared, pipe = up
        self.landed(r, now)  # a refund comes with its answer: it has landed
        step = shared.settle_request(r, actual, now)
        if step is not None:
            self._send(pipe, None, step)
            self._announce(r.keys)

    def observe(
        self,
        keys: Sequence[str],
        limits: Sequence[Limit],
        views: Sequence[ServerView],
        now: float,
        seen: LevelSeen | None = None,
    ) -> None:
        self.fleet.observe_local(keys, limits, views, now)
        self._tell(
            keys,
            limits,
            lambda s: s.observe_request(keys, limits, views, now),
            token=None if seen is None else _Seen(seen),
        )

    def throttled(
        self,
        keys: Sequence[str],
        limits: Sequence[Limit],
        now: float,
        retry_after: float | None,
    ) -> float:
        until = self.fleet.throttled_local(keys, limits, now, retry_after)
        retry = retry_after if retry_after and retry_after > 0 else 0.0
        if self._tell(keys, limits, lambda s: s.throttled_request(keys, limits, now, retry)):
            return now + retry
        return until

    # ------------------------------------------------------------------ blocking steps (rare)

    def reserve(
        self,
        keys: Sequence[str],
        limits: Sequence[Limit],
        cost: float | Sequence[float],
        now: float,
        max_wait: float,
    ) -> Reservation | Shed:
        """A reservation answered now (the fleet store's: one round trip while
        Redis is up). The pacer asks :meth:`reserve_later` instead; this is
        the store contract's blocking form."""
        return self.fleet.reserve(keys, limits, cost, now, max_wait)

    def earliest(self, r: Reservation, now: float) -> float:
        return self.fleet.earliest(r, now)

    def confirm(self, r: Reservation, now: float) -> float | None:
        return self.fleet.confirm(r, now)

    # ------------------------------------------------------------------ facts

    def fact(self, name: str) -> tuple[float, float] | None:
        """The fact as this process knows it now: Redis's when read, else the
        machine's own word (its local share's) while the read is on its way;
        :attr:`facts_generation` moves when Redis's answer differs."""
        up = self._pipe_now(facts=True)
        if up is None:
            return self.fleet.fact(name)
        shared, pipe = up
        known, got = shared.fact_cached(name)
        if known:
            return got
        if name not in self._reading:
            self._reading.add(name)
            self._command(pipe, _Read(name, shared.generation), "GET", shared.fact_key(name))
        return self.fleet.local.fact(name)

    def _read_came(self, shared: RedisStore, read: _Read, raw: Reply) -> None:
        value = raw if isinstance(raw, bytes) or raw is None else None
        if not read.name:
            before = shared.generation
            shared.generation_came(value)
            if shared.generation != before:
                self._reading.clear()  # reads sent before the change: their values may be old
            return
        self._reading.discard(read.name)
        got = shared.fact_came(read.name, value, read.generation)
        kept = self.fleet.local.fact(read.name)
        if got is not None:
            if got != kept:
                self.fleet.local.put_fact(read.name, *got)  # kept for a fall back
                self._news += 1  # the pacer reads its limits again
        elif kept is not None:
            # Redis lost it (restarted empty): what this machine learned is shared
            # again, sent over the pipe like any fact
            self.put_fact(read.name, *kept)

    def _command(self, pipe: SocketPipe, token: object, *args: str | bytes) -> None:
        idle = not pipe.pending()
        pipe.command(token, *args)
        if idle:
            pipe.flush()
        if isinstance(token, _Read):
            self.reads += 1
        else:
            self.sent += 1

    def put_fact(self, name: str, a: float, b: float) -> bool:
        """Kept in the local share at once and sent to Redis without waiting;
        True when the machine's word changed."""
        up = self._pipe_now(facts=True)
        if up is None:
            return self.fleet.put_fact(name, a, b)
        changed = self.fleet.local.put_fact(name, a, b)
        shared, pipe = up
        request = shared.put_fact_request(name, a, b)
        if request is not None:
            keys, args = request
            idle = not pipe.pending()
            pipe.send(_Put(name, args), "put_fact", keys, *args)
            if idle:
                pipe.flush()
            self.sent += 1
            # this process reads its own word from now on, before Redis answers
            shared.fact_came(name, args[0])
        if changed:
            self._news += 1  # the pacer reads its limits again
        return changed

    @property
    def facts_generation(self) -> int:
        """Moves when Redis's counter moved (read without waiting, every
        ``facts_refresh`` s), when a fact read came back different, or when
        the store answering changed (Redis, or the local share)."""
        up = self._pipe_now(facts=True)
        seen: tuple[int, ...]
        if up is None:
            seen = (0, self.fleet.facts_generation, self._news)
        else:
            shared, pipe = up
            key = shared.generation_due()
            if key is not None:
                self._command(pipe, _Read("", shared.generation), "GET", key)
            seen = (1, shared.generation, self._news)
        if seen != self._gen_seen:
            self._gen_seen = seen
            self._generation += 1
        return self._generation

    # ------------------------------------------------------------------ falling back

    @property
    def on_fall_back(self) -> Callable[[], None]:
        """Called when the fleet store falls back (FleetStore.on_fall_back)."""
        return self.fleet.on_fall_back

    @on_fall_back.setter
    def on_fall_back(self, told: Callable[[], None]) -> None:
        self.fleet.on_fall_back = told

    def carry(self, r: Reservation, now: float) -> Reservation | None:
        return self.fleet.carry(r, now)

    # ------------------------------------------------------------------ the line, housekeeping

    @property
    def recheck(self) -> float:
        return self.fleet.recheck

    @recheck.setter
    def recheck(self, seconds: float) -> None:
        self.fleet.recheck = seconds

    def fileno(self) -> int:
        """Readable when answers came or buckets moved (the module docstring)."""
        return self._epoll.fileno()

    def moved(self) -> list[str]:
        return self.fleet.moved()

    def stats(self) -> dict[str, int | str]:
        out = self.fleet.stats()
        pipes = [pipe for pipe, _ in self._pipes.values()]
        reloads = self._reloads + sum(pipe.reloads for pipe in pipes)
        out["script_reloads"] = int(out.get("script_reloads", 0)) + reloads
        out.update(
            {
                "transport": "socket pipe",
                "pipes": self.pipes,
                "steps_sent": self.sent,
                "facts_read": self.reads,
                "writes": self._writes + sum(pipe.round_trips for pipe in pipes),
                "in_flight": len(self._asks),
                "late_answers": self.late_answers,
                "lost_answers": self.lost_answers,
                "redirects": self.redirects,
            }
        )
        return out

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
        self._drop_pipes()
        os.close(self._moved_fd)
        self._epoll.close()
        self.fleet.close()
