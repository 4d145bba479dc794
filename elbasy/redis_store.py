"""The quota store of a fleet: every account's clocks in a real Redis server.

Several elbasy machines (``--quota-store redis://HOST:PORT/DB``) share each
account's quota exactly when every step on an account is one atomic step on
one Redis server. :class:`RedisStore` implements :class:`~elbasy.quota.QuotaStore`
with the arithmetic of :class:`~elbasy.quota.LocalStore` (the same results on
the same inputs: tests/test_quota.py runs its contract suite on both) as Lua
scripts, one call per step:

* ``reserve``, ``earliest``, ``confirm``, ``landed``, ``observe``,
  ``throttled``, ``give_back`` and ``settle`` are each one ``EVALSHA`` of a script in
  ``elbasy/lua/`` (``prelude.lua`` is put in front of each). The scripts are
  loaded once (``SCRIPT LOAD``) when the store is made, and again when the
  server answers ``NOSCRIPT`` (after a restart, a failover or a
  ``SCRIPT FLUSH``): the call that met it is sent once more, which is safe
  because a call that met ``NOSCRIPT`` ran nothing;
* the records of one account's limits carry one hash tag (:func:`account_tag`:
  the rule and the first scope value of the bucket key, the shop or the
  seller), so every script touches one slot of a Redis Cluster;
* every record expires (``SET ... PX``) once its bucket would be a fresh
  one's equal (nothing queued or in flight, its clocks and any block in
  the past) plus ``idle_grace`` seconds; units still queued or in flight
  keep it ``queued_grace`` seconds more (the longest wait), after which the
  units of a reservation whose machine died are finally dropped;
* facts (plans, tiers, query shapes' costs) are kept in Redis too, each for
  ``fact_ttl`` seconds after it was last written, with one generation
  counter beside them. They are read through a cache in this process that
  is valid while that counter stays where it was; the counter is read again
  at most every ``facts_refresh`` seconds (and moves at once on this
  instance's own writes). Another machine's fact is seen within that time.

The clock. Machines disagree about the time, so with ``clock="server"``
(the default, what ``--quota-store redis://`` uses) a script takes *its* now
from ``redis.call('TIME')`` and every clock in Redis is on the server's time
base. The caller still passes its ``now`` (the protocol's argument): each
reply carries the server's now, and a time the store returns is the
caller's ``now`` plus the script's ``t - server_now``. A caller with a skewed
clock gets the same offsets as everyone else, so every machine departs at
the same real moment. (The one-way trip to Redis makes a departure early by
that much: the confirm at departure, run on the server's clock, makes it wait
the rest.) Window indices (``Reservation.slots`` of a window limit) are on
the server's time base too; only the store reads them.

``clock="caller"`` trusts the ``now`` of each call instead (the script uses it
as its now): the contract tests pass explicit times, and a single machine
whose clock is the only one gains nothing from TIME. The arithmetic is the
same in both modes; in this one the conversion is the identity, so results
are bit for bit LocalStore's.

Numbers cross the wire as little-endian doubles packed with Lua's ``struct``
(ARGV[1] in, one bulk string out): exact, where Redis' number replies would
truncate to integers and its string conversion keeps 14 digits.

What is missing (issue 14), said plainly:

* every call of this class **blocks** the caller for one round trip (a
  socket timeout of ``timeout`` seconds bounds it). The loop does not call
  it for its steps: :mod:`elbasy.piped_store` sends the same requests
  (each step's ``*_request`` half) over the worker's own socket and reads
  their answers with the same halves (``reserved``, ``confirmed``,
  ``earliest_answer``) when they come. Facts are still read here, blocking;
* a place given back or a refund is announced on one pub/sub channel for
  every account (``<prefix>moved``, elbasy.redis_moves), one extra blocking
  ``PUBLISH``; a channel per account, or the scripts publishing, would be
  leaner, and a lost message is caught only by ``recheck``;
* a call here raises ``redis.exceptions.ConnectionError`` (or
  ``TimeoutError``) when Redis is unreachable or slow: what
  ``--quota-store redis://`` builds is a :class:`~elbasy.fleet_store.FleetStore`
  around this store, which falls back to a local share of each account's
  quota then (and comes back);
* a Sentinel's master and a Cluster are reached through redis-py's clients
  (:func:`connect`); elbasy.piped_store asks them where each step goes.
"""

from __future__ import annotations

import math
import os
import struct
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from hashlib import sha1
from pathlib import Path
from typing import Any, Literal

from elbasy.limits import BUCKET, ROLLING, WINDOW, Limit, ServerView
from elbasy.quota import (
    EVERY_LINE,
    LevelSeen,
    Reservation,
    Safety,
    Shed,
    _per_limit,
    derived,
    view_entries,
)
from elbasy.redis_moves import RedisMoves
from elbasy.redis_moves import encode as encode_moves

__all__ = [
    "PASSWORD_ENV",
    "SCRIPTS",
    "RedisShared",
    "RedisStore",
    "account_tag",
    "answer",
    "check_reachable",
    "connect",
    "redact",
]

#: the environment variable a password comes from when the URL has none
PASSWORD_ENV = "ELBASY_REDIS_PASSWORD"
#: URL schemes this store accepts: redis-py's own, and a Sentinel's or a
#: Cluster's (elbasy's names for them: redis-py has no URL for either)
SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster")
#: a reservation this close to a time counts as at it (quota._EPS)
_EPS = 1e-9
_KINDS = {BUCKET: 0.0, WINDOW: 1.0, ROLLING: 2.0}
_LUA = Path(__file__).with_name("lua")
#: the step scripts (each with the prelude in front) and the facts' one
STEPS = (
    "reserve",
    "earliest",
    "confirm",
    "landed",
    "observe",
    "throttled",
    "give_back",
    "settle",
)
#: keys (and account tuples) this process remembers; cleared when it reaches this
_REMEMBER = 100_000
#: one step as it goes on the wire: (script name, Redis keys, ARGV[1])
Step = tuple[str, tuple[str, ...], bytes]


def unlimited(
    keys: Sequence[str], costs: tuple[float, ...], now: float, max_wait: float
) -> Reservation | Shed:
    """The reservation of a request with no limits (nothing to ask the server)."""
    if max_wait < -_EPS:
        return Shed(0.0, "")
    return Reservation(tuple(keys), (), costs, now, (), ())


def _script(name: str) -> str:
    body = (_LUA / f"{name}.lua").read_text()
    if name in STEPS:
        return (_LUA / "prelude.lua").read_text() + "\n" + body
    return body


#: every script's source by name, as sent to SCRIPT LOAD
SCRIPTS: dict[str, str] = {name: _script(name) for name in (*STEPS, "put_fact")}


def account_tag(key: str) -> str:
    """The hash tag of a bucket key: every limit of one account shares it.

    A rule's bucket key is ``rule|limit|scope values...`` (elbasy.rules): the
    tag is the rule and the first scope value (the shop, the seller, the
    principal), so the limits of one account land in one Redis Cluster slot
    while accounts spread over the cluster. A key of another shape is its
    own tag.
    """
    parts = key.split("|", 3)
    if len(parts) >= 3:
        return f"{parts[0]}|{parts[2]}"
    return key


def connect(url: str, *, timeout: float = 0.5, password: str | None = None) -> Any:
    """A redis-py client for ``url``.

    * ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``, ``rediss://...`` (TLS),
      ``unix://PATH``: one server (redis-py's URLs);
    * ``redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]``:
      the master the Sentinels name for SERVICE, found again after a failover;
      the password is the master's (the Sentinels are asked without one);
    * ``redis+cluster://[[USER]:PASSWORD@]HOST:PORT``: a Redis Cluster reached
      through any of its nodes (every script touches one slot: account_tag).

    The password is the URL's, else ``password``, else ``$ELBASY_REDIS_PASSWORD``.
    ``timeout`` bounds connecting and every reply (seconds). hiredis parses
    replies when it is installed (redis-py picks it).
    """
    import redis

    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in SCHEMES:
        raise ValueError(
            f"a Redis quota store URL is redis://HOST[:PORT][/DB], rediss://..., "
            f"unix://PATH, redis+sentinel://HOST:PORT[,HOST:PORT]/SERVICE[/DB] or "
            f"redis+cluster://HOST:PORT, got {redact(url)!r}"
        )
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"the Redis timeout must be > 0 seconds, got {timeout!r}")
    options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    secret = password or os.environ.get(PASSWORD_ENV)
    if scheme == "redis+sentinel":
        return _sentinel_master(url, secret, options)
    plain = url if scheme != "redis+cluster" else "redis://" + url.split("://", 1)[1]
    make: Callable[..., Any] = redis.Redis.from_url
    if scheme == "redis+cluster":
        from redis.cluster import RedisCluster

        make = RedisCluster.from_url
    try:
        client = make(plain, **options)
    except ValueError as exc:
        raise ValueError(f"bad Redis URL {redact(url)!r}: {exc}") from None
    if secret and not _password_of(plain):
        client.close()
        client = make(plain, password=secret, **options)
    return client


def _password_of(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).password or ""


def _sentinel_master(url: str, secret: str | None, options: dict[str, Any]) -> Any:
    """The master client of a ``redis+sentinel://`` URL (see connect)."""
    from urllib.parse import unquote

    from redis.sentinel import Sentinel

    rest = url.split("://", 1)[1]
    auth, _, rest = rest.rpartition("@")
    hosts, _, path = rest.partition("/")
    parts = [p for p in path.split("/") if p]
    try:
        sentinels = []
        for hostport in hosts.split(","):
            host, _, port = hostport.rpartition(":")
            sentinels.append((host.strip("[]") or "127.0.0.1", int(port or 26379)))
        if not parts or len(parts) > 2:
            raise ValueError("the path is /SERVICE or /SERVICE/DB")
        db = int(parts[1]) if len(parts) == 2 else 0
    except ValueError as exc:
        raise ValueError(f"bad Redis Sentinel URL {redact(url)!r}: {exc}") from None
    user, _, pw = auth.partition(":") if ":" in auth else ("", "", "")
    master_options = dict(options, db=db, password=unquote(pw) or secret or None)
    if user:
        master_options["username"] = unquote(user)
    sentinel = Sentinel(sentinels, sentinel_kwargs=dict(options), **options)  # type: ignore[no-untyped-call]
    return sentinel.master_for(unquote(parts[0]), **master_options)  # type: ignore[no-untyped-call]


@dataclass(frozen=True, slots=True)
class RedisShared:
    """What the supervisor hands every worker for ``--quota-store redis://``: the
    URL (each worker connects after the fork: a socket is never shared) and the
    machine's shared-memory table its workers fall back on together while
    Redis is down (elbasy.fleet_store; None: each worker on its own)."""

    url: str
    timeout: float = 0.5
    table: Any = field(default=None, compare=False, repr=False)

    def redacted(self) -> str:
        """The URL without its password, for logs."""
        return redact(self.url)


def redact(url: str) -> str:
    """A Redis URL with any password replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    auth, at, host = rest.rpartition("@")
    if not at:
        return url
    user = auth.split(":", 1)[0] if ":" in auth else ""
    return f"{scheme}{sep}{user}:***@{host}"


def check_reachable(shared: RedisShared) -> str:
    """PING the server once (at startup): its version, or ConnectionError saying why not."""
    import redis

    client = connect(shared.url, timeout=shared.timeout)
    try:
        client.ping()
        return str(client.info("server").get("redis_version", "?"))
    except redis.exceptions.RedisError as exc:
        raise ConnectionError(f"Redis at {shared.redacted()}: {exc}") from None
    finally:
        client.close()


def _pack(values: Sequence[float]) -> bytes:
    return struct.pack(f"<{len(values)}d", *values)


def answer(raw: bytes) -> tuple[float, ...]:
    """A step script's reply: its doubles (the script's now first)."""
    if not isinstance(raw, bytes) or len(raw) % 8:
        raise ValueError(f"not a quota script's reply: {raw!r:.80}")
    return struct.unpack(f"<{len(raw) // 8}d", raw)


def levels_seen(got: tuple[float, ...], seen: LevelSeen) -> None:
    """Tells ``seen`` the levels the observe script's answer carries: after its
    now, (limit index, the server's level, the store's before the merge)."""
    for i in range(1, len(got) - 2, 3):
        seen(int(got[i]), got[i + 1], got[i + 2])


class RedisStore:
    """Every account's clocks in Redis, shared by every machine (QuotaStore).

    ``target`` is a URL (see :func:`connect`) or a redis-py client.
    """

    #: another machine's refunds come by pub/sub (elbasy.redis_moves), which may
    #: lose one: a refunding line's head also asks again this often
    recheck = 0.5

    def __init__(
        self,
        target: str | Any,
        safety: Safety | None = None,
        *,
        clock: Literal["server", "caller"] = "server",
        prefix: str = "elbasy:",
        idle_grace: float = 60.0,
        queued_grace: float = 3600.0,
        fact_ttl: float = 30 * 86400.0,
        facts_refresh: float = 0.5,
        timeout: float = 0.5,
        tag_of: Callable[[str], str] = account_tag,
        mono: Callable[[], float] = time.monotonic,
        wake_fd: int = -1,
    ) -> None:
        if clock not in ("server", "caller"):
            raise ValueError(f"clock must be 'server' or 'caller', got {clock!r}")
        for name, value in (
            ("idle_grace", idle_grace),
            ("queued_grace", queued_grace),
            ("facts_refresh", facts_refresh),
        ):
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number of seconds >= 0")
        if not (fact_ttl >= 0.001 and math.isfinite(fact_ttl)):
            raise ValueError("fact_ttl must be a finite number of seconds >= 0.001")
        self.url = target if isinstance(target, str) else ""
        self.client = connect(target, timeout=timeout) if isinstance(target, str) else target
        self.safety = safety or Safety()
        self.clock = clock
        self.prefix = prefix
        self.idle_grace = idle_grace
        self.queued_grace = queued_grace
        self.tag_of = tag_of
        self._mono = mono
        self._mode = 1.0 if clock == "server" else 0.0
        self._shas = {name: sha1(src.encode()).hexdigest() for name, src in SCRIPTS.items()}
        self._keys: dict[tuple[tuple[str, ...], tuple[str, ...]], tuple[str, ...]] = {}
        self._params: dict[tuple[Limit, ...], bytes] = {}
        # facts: the values read (None: known missing) while the counter is at _gen_seen
        self._fact_ttl_ms = str(max(1, math.ceil(fact_ttl * 1000)))
        self._facts_refresh = facts_refresh
        self._facts: dict[str, tuple[float, float] | None] = {}
        self._gen_key = f"{prefix}{{facts}}:generation"
        self._gen_seen: int | None = None
        self._gen_read_at = -math.inf
        self._generation = 0  # this process's count of changes seen (monotone)
        self.calls = 0  # script calls made
        self.reloads = 0  # scripts loaded again after NOSCRIPT
        self.load_scripts()
        # other stores' refunds and places given back, heard on a thread of its own
        self._moves = RedisMoves(
            self.client,
            f"{prefix}moved",
            f"{os.getpid()}-{uuid.uuid4().hex}",
            EVERY_LINE,
            wake_fd,
        )

    # ------------------------------------------------------------------ scripts

    def load_scripts(self) -> None:
        """SCRIPT LOAD every script (the server's SHA must be the one computed here)."""
        for name, src in SCRIPTS.items():
            got = self.client.script_load(src)
            got = got.decode() if isinstance(got, bytes) else got
            if got != self._shas[name]:
                want = self._shas[name]
                raise RuntimeError(f"Redis gave script {name} the SHA {got}, not {want}")

    def _call(self, name: str, keys: Sequence[str], blob: bytes) -> Any:
        """One EVALSHA; a NOSCRIPT answer loads the script again and sends it once more."""
        from redis.exceptions import NoScriptError

        self.calls += 1
        try:
            return self.client.evalsha(self._shas[name], len(keys), *keys, blob)
        except NoScriptError:
            self.reloads += 1
            self.client.script_load(SCRIPTS[name])
            return self.client.evalsha(self._shas[name], len(keys), *keys, blob)

    # ------------------------------------------------------------------ accounts

    def key_of(self, key: str, limit: str) -> str:
        """The Redis key of one bucket (one limit of one account)."""
        return f"{self.prefix}{{{self.tag_of(key)}}}:{key}\x1f{limit}"

    def _rkeys(self, keys: Sequence[str], limits: Sequence[Limit]) -> tuple[str, ...]:
        names = tuple(limit.name for limit in limits)
        ident = (tuple(keys), names)
        got = self._keys.get(ident)
        if got is None:
            if len(ident[0]) != len(names):
                raise ValueError(f"{len(ident[0])} keys for {len(names)} limits")
            if len(self._keys) >= _REMEMBER:
                self._keys.clear()
            got = self._keys[ident] = tuple(
                self.key_of(k, n) for k, n in zip(ident[0], names, strict=True)
            )
        return got

    def _head(self, limits: Sequence[Limit], now: float) -> bytes:
        """The header and the limits' numbers, as every step script reads them."""
        if not math.isfinite(now):
            raise ValueError(f"now must be a finite time, got {now!r}")
        value = tuple(limits)
        params = self._params.get(value)
        if params is None:
            numbers: list[float] = []
            for limit in value:
                interval, room, quota, period, guard = derived(limit, self.safety)
                span = limit.sub_buckets if limit.kind == ROLLING else 1
                numbers += [_KINDS[limit.kind], span, interval, room, quota, period, guard]
                numbers.append(limit.capacity)
            if len(self._params) >= _REMEMBER:
                self._params.clear()
            params = self._params[value] = _pack(numbers)
        header = (self._mode, now, self.idle_grace, self.queued_grace, float(len(value)))
        return _pack(header) + params

    def request(
        self, name: str, keys: Sequence[str], limits: Sequence[Limit], now: float, *more: float
    ) -> Step:
        """One step as it goes on the wire: (script name, Redis keys, ARGV[1]).

        What a non-blocking transport (elbasy.redis_pipe) sends; its answer is
        read with :func:`answer`. ``more``: the step's own numbers (see its script).
        """
        return name, self._rkeys(keys, limits), self._head(limits, now) + _pack(more)

    def sha(self, name: str) -> str:
        """The SHA1 a script is called by."""
        return self._shas[name]

    def _step(
        self, name: str, keys: Sequence[str], limits: Sequence[Limit], now: float, *more: float
    ) -> tuple[float, ...]:
        _, rkeys, blob = self.request(name, keys, limits, now, *more)
        return answer(self._call(name, rkeys, blob))

    def _run(self, step: Step | None) -> tuple[float, ...]:
        """Send one step and wait for its answer (this class's blocking way)."""
        if step is None:
            return ()
        name, rkeys, blob = step
        return answer(self._call(name, rkeys, blob))

    @staticmethod
    def _here(t: float, server_now: float, now: float) -> float:
        """A time of the script's clock on the caller's (the identity with clock='caller')."""
        return t if server_now == now else now + (t - server_now)

    # ------------------------------------------------------------------ each step in two halves
    #
    # The request a step sends and what its answer means, apart, so a
    # transport that does not wait (elbasy.piped_store, over the loop's own
    # socket) sends the same bytes and reads them the same way as the
    # blocking methods below. A ``*_request`` of None: nothing to send.

    def reserve_request(
        self,
        keys: Sequence[str],
        limits: Sequence[Limit],
        costs: tuple[float, ...],
        now: float,
        max_wait: float,
    ) -> Step:
        if math.isnan(max_wait):
            raise ValueError("max_wait must be a number of seconds")
        return self.request("reserve", keys, limits, now, *costs, max_wait)

    def reserved(
        self,
        out: tuple[float, ...],
        keys: Sequence[str],
        limits: Sequence[Limit],
        costs: tuple[float, ...],
        now: float,
    ) -> Reservation | Shed:
        server_now, code, depart, which = out[0], out[1], out[2], int(out[3])
        if code:
            return Shed(depart - server_now, limits[which].name)
        n = len(limits)
        return Reservation(
            tuple(keys),
            tuple(limits),
            costs,
            self._here(depart, server_now, now),
            out[4 : 4 + n],
            out[4 + n : 4 + 2 * n],
        )

    def earliest_request(self, r: Reservation, now: float) -> Step:
        return self.request("earliest", r.keys, r.limits, now, *r.costs, *r.slots, *r.positions)

    def earliest_answer(self, out: tuple[float, ...], now: float) -> float:
        return self._here(out[1], out[0], now)

    def confirm_request(self, r: Reservation, now: float) -> Step:
        return self.request("confirm", r.keys, r.limits, now, *r.costs, *r.slots, *r.positions)

    def confirmed(self, r: Reservation, out: tuple[float, ...], now: float) -> float | None:
        """The confirm's answer: a later time (wall), or None (``r`` is sent)."""
        if out[1]:
            return self._here(out[2], out[0], now)
        slots = out[3 : 3 + len(r.limits)]
        if slots != r.slots:
            r.slots = slots
        r.sent = True
        return None

    def observe_request(
        self,
        keys: Sequence[str],
        limits: Sequence[Limit],
        views: Sequence[ServerView],
        now: float,
    ) -> Step | None:
        if not limits:
            return None
        entries: list[float] = []
        for k, value, reset in view_entries(limits, views, self.safety):
            entries += [float(k), math.nan if value is None else value]
            entries.append(math.nan if reset is None else reset)
        if not entries:
            return None
        return self.request("observe", keys, limits, now, len(entries) / 3, *entries)

    def throttled_request(
        self, keys: Sequence[str], limits: Sequence[Limit], now: float, retry: float
    ) -> Step | None:
        return self.request("throttled", keys, limits, now, retry) if limits else None

    def landed_request(self, r: Reservation, now: float) -> Step | None:
        """Marks ``r`` landed; the step that tells the server, if any."""
        if not r.sent or r.landed:
            return None
        r.landed = True
        return self.request("landed", r.keys, r.limits, now, *r.slots) if r.limits else None

    def give_back_request(self, r: Reservation, now: float) -> Step | None:
        """Marks ``r`` returned; the step that gives its place back, if any."""
        r.returned = True
        if not r.limits:
            return None
        return self.request("give_back", r.keys, r.limits, now, *r.costs, *r.slots)

    def settle_request(
        self, r: Reservation, actual: float | Sequence[float], now: float
    ) -> Step | None:
        """The refund of what ``r`` took beyond ``actual``, if any (land it first)."""
        actuals = _per_limit(actual, r.limits)
        refunds = tuple(
            r.slots[k] - min(max(actuals[k], 0.0), r.slots[k]) if limit.kind == BUCKET else 0.0
            for k, limit in enumerate(r.limits)
        )
        if not any(x > 0 for x in refunds):
            return None
        return self.request("settle", r.keys, r.limits, now, *refunds)

    def announcement(self, keys: Sequence[str]) -> tuple[str, bytes]:
        """The PUBLISH (channel, message) that tells every store room came back on ``keys``."""
        return self._moves.channel, encode_moves(self._moves.origin, list(keys))

    # ------------------------------------------------------------------ the interface

    def reserve(
        self,
        keys: Sequence[str],
        limits: Sequence[Limit],
        cost: float | Sequence[float],
        now: float,
        max_wait: float,
    ) -> Reservation | Shed:
        """LocalStore.reserve, shared by every machine on the server."""
        costs = _per_limit(cost, limits)
        if not limits:
            return unlimited(keys, costs, now, max_wait)
        out = self._run(self.reserve_request(keys, limits, costs, now, max_wait))
        return self.reserved(out, keys, limits, costs, now)

    def earliest(self, r: Reservation, now: float) -> float:
        if r.sent or not r.limits:
            return now
        return self.earliest_answer(self._run(self.earliest_request(r, now)), now)

    def confirm(self, r: Reservation, now: float) -> float | None:
        if r.sent:
            return None
        if not r.limits:
            r.sent = True
            return None
        return self.confirmed(r, self._run(self.confirm_request(r, now)), now)

    def observe(
        self,
        keys: Sequence[str],
        limits: Sequence[Limit],
        views: Sequence[ServerView],
        now: float,
        seen: LevelSeen | None = None,
    ) -> None:
        got = self._run(self.observe_request(keys, limits, views, now))
        if seen is not None:
            levels_seen(got, seen)

    def throttled(
        self,
        keys: Sequence[str],
        limits: Sequence[Limit],
        now: float,
        retry_after: float | None,
    ) -> float:
        retry = retry_after if retry_after and retry_after > 0 else 0.0
        self._run(self.throttled_request(keys, limits, now, retry))
        return now + retry

    def landed(self, r: Reservation, now: float) -> None:
        self._run(self.landed_request(r, now))

    def give_back(self, r: Reservation, now: float) -> bool:
        if r.sent or r.returned:
            return False
        step = self.give_back_request(r, now)
        if step is not None:
            self._run(step)
            self._announce(r.keys)
        return True

    def settle(self, r: Reservation, actual: float | Sequence[float], now: float) -> None:
        if not r.sent or not r.limits:
            return
        self.landed(r, now)  # a refund comes with its answer: it has landed
        step = self.settle_request(r, actual, now)
        if step is not None:
            self._run(step)
            self._announce(r.keys)

    # ------------------------------------------------------------------ facts

    def _fact_key(self, name: str) -> str:
        return f"{self.prefix}{{facts}}:{name}"

    def _saw_generation(self, gen: int) -> None:
        if gen != self._gen_seen:
            self._gen_seen = gen
            self._facts.clear()
            self._generation += 1

    # each read in two halves, as the steps (elbasy.piped_store reads them
    # over its own socket): the key to GET, and what its value means

    def generation_due(self) -> str | None:
        """The key of the facts' generation counter when it is due to be read
        again (marked read now), else None."""
        at = self._mono()
        if at - self._gen_read_at < self._facts_refresh:
            return None
        self._gen_read_at = at
        return self._gen_key

    def generation_came(self, raw: bytes | None) -> None:
        """The counter's value: a change empties the cache of facts."""
        self._saw_generation(int(raw or 0))

    @property
    def generation(self) -> int:
        """This process's count of the changes seen so far (no read)."""
        return self._generation

    def fact_key(self, name: str) -> str:
        return self._fact_key(name)

    def fact_cached(self, name: str) -> tuple[bool, tuple[float, float] | None]:
        """(known, the fact): known False when it must be read."""
        if name in self._facts:
            return True, self._facts[name]
        return False, None

    def fact_came(
        self, name: str, raw: bytes | None, generation: int | None = None
    ) -> tuple[float, float] | None:
        """A fact's value as read; cached unless the counter moved since the read
        was sent (``generation``: :attr:`generation` then)."""
        got: tuple[float, float] | None = None
        if raw is not None and len(raw) == 16:
            a, b = struct.unpack("<2d", raw)
            got = (a, b)
        if generation is None or generation == self._generation:
            if len(self._facts) >= _REMEMBER:
                self._facts.clear()
            self._facts[name] = got
        return got

    @property
    def facts_generation(self) -> int:
        """Moves whenever any machine changed a fact (seen within ``facts_refresh`` s)."""
        key = self.generation_due()
        if key is not None:
            self.generation_came(self.client.get(key))
        return self._generation

    def fact(self, name: str) -> tuple[float, float] | None:
        """A learned fact every machine shares, or None (LocalStore.fact)."""
        self.facts_generation  # noqa: B018 - a changed counter empties the cache
        known, got = self.fact_cached(name)
        if known:
            return got
        return self.fact_came(name, self.client.get(self._fact_key(name)))

    def put_fact_request(
        self, name: str, a: float, b: float
    ) -> tuple[tuple[str, str], tuple[bytes, str]] | None:
        """The put_fact script's (keys, ARGV) for a fact, or None when this
        process knows Redis holds it already."""
        a, b = float(a) + 0.0, float(b) + 0.0  # -0.0 is 0.0, as == says
        if not (math.isfinite(a) and math.isfinite(b)):
            raise ValueError("a fact is two finite numbers")
        if self._facts.get(name) == (a, b):
            return None
        self.calls += 1
        keys = (self._fact_key(name), self._gen_key)
        return keys, (struct.pack("<2d", a, b), self._fact_ttl_ms)

    def put_fact_came(self, name: str, args: tuple[bytes, str], reply: Sequence[int]) -> bool:
        """The put_fact script's answer (changed, generation): True when it changed."""
        changed, gen = reply
        if changed:
            # our own change: the counter moved by one (more if others wrote too)
            self._saw_generation(int(gen))
            self._gen_read_at = self._mono()
        self._facts[name] = struct.unpack("<2d", args[0])
        return bool(changed)

    def put_fact(self, name: str, a: float, b: float) -> bool:
        """Keep a fact for every machine; True when it changed (LocalStore.put_fact)."""
        request = self.put_fact_request(name, a, b)
        if request is None:
            return False
        keys, args = request
        from redis.exceptions import NoScriptError

        try:
            reply = self.client.evalsha(self._shas["put_fact"], 2, *keys, *args)
        except NoScriptError:
            self.reloads += 1
            self.client.script_load(SCRIPTS["put_fact"])
            reply = self.client.evalsha(self._shas["put_fact"], 2, *keys, *args)
        return self.put_fact_came(name, args, reply)

    # ------------------------------------------------------------------ the line, housekeeping

    def fileno(self) -> int:
        """Readable when another store on this Redis moved buckets (elbasy.redis_moves)."""
        return self._moves.fileno()

    def moved(self) -> list[str]:
        """Buckets other stores (machines, workers) moved since the last call."""
        return self._moves.take()

    def _announce(self, keys: Sequence[str]) -> None:
        """Room came back on these buckets: the others' lines may move up."""
        self.client.publish(*self.announcement(keys))

    def peek(self, key: str, limit: str) -> tuple[float, ...] | None:
        """One bucket's record as stored (prelude.lua's layout), or None; for tests."""
        raw = self.client.get(self.key_of(key, limit))
        return None if raw is None else answer(raw)

    def stats(self) -> dict[str, int | str]:
        """For /healthz: where the store is and what it did."""
        pool = getattr(self.client, "connection_pool", None)
        kwargs = pool.connection_kwargs if pool is not None else {}
        if self.url:
            where = redact(self.url).split("://", 1)[1]
        else:
            where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        return {
            "store": "redis",
            "server": str(where),
            "clock": self.clock,
            "calls": self.calls,
            "script_reloads": self.reloads,
        }

    def ping(self) -> None:
        """One PING (bounded by the timeout): raises when the server does not answer."""
        self.client.ping()

    def close(self) -> None:
        self._moves.close()
        self.client.close()
