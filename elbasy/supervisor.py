"""The supervisor: one process that starts, watches and retires elbasy's workers.

``elbasy --workers N`` (1 by default) runs this. Before any fork it parses the
config, raises RLIMIT_NOFILE to the hard limit, opens the listening sockets
(one SO_REUSEPORT socket per worker, all on one port: the kernel spreads new
connections over them) and loads (or makes) the CA, so workers only ever
load it. Each worker is a forked process that builds a
:class:`elbasy.server.Worker` around the socket of its index and runs its
own loop. The supervisor keeps every socket open: a restarted worker, or a
reload's new worker of the same index, polls the very socket its
predecessor did, so nothing in an accept queue is reset. The supervisor
serves no traffic; it answers signals:

* SIGTERM, and the first Ctrl-C: drain. Every worker gets SIGTERM and runs
  ``Loop.drain(--drain-timeout)``; the supervisor exits 0 when all are gone.
* a second Ctrl-C: stop now (SIGUSR2 to the workers: every connection closed).
* SIGHUP: reload. The command line is read again with the environment and
  config file as they are now; an invalid config is logged and changes
  nothing. Otherwise new workers start with it, and once every one of them
  is ready the old ones drain. The listening socket stays open throughout,
  so no connection is refused or reset.
* SIGUSR1: reopen the ``--log-file`` and ``--access-log`` file (here and in every worker).

Workers ignore SIGINT (a terminal's Ctrl-C reaches the whole process group)
and SIGHUP: they act on what the supervisor sends them only. A worker that
dies is restarted after a backoff (0.1 s doubling to 10 s, back to 0.1 s once
one ran for 10 s), its death logged; a worker that keeps crashing never
takes the supervisor down.

Hooks for a quota store shared by the workers, kept minimal: the supervisor
calls :func:`make_shared` once, before the first fork; what it returns goes,
with the worker's *slot* (0..31, unique among live workers; a restarted
worker takes its predecessor's, a reload's new workers take free ones), to
every worker's :func:`elbasy.server.make_store`; after reaping any worker the
supervisor calls :func:`on_worker_gone` with that worker's slot.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from elbasy import __version__
from elbasy.access import Access, warn_if_open, warn_if_transparent_open
from elbasy.config import Config, ConfigError, format_hostport, parse_listen, worker_count
from elbasy.hostglob import some_hosts
from elbasy.logs import (
    access_log_file,
    configure,
    reopen_log_file,
    reverse_banner,
    startup_banner,
    startup_next,
    tls_listener_banner,
    transparent_banner,
)
from elbasy.metrics import InstanceView, MetricsMemory, exposition
from elbasy.metrics_http import MetricsListener
from elbasy.server import (
    StartupError,
    Worker,
    access_of,
    bind_error,
    intercepted_hosts,
    listen,
    listen_group,
    listen_sites,
    listener_tls_pem,
    prepare_ca,
    raise_fd_limit,
)
from elbasy.status import proxy_url

log = logging.getLogger("elbasy.supervisor")

#: slots of the shared store; workers take one each (N <= 16 leaves room for a reload)
SLOTS = 32
#: a worker that has not said it is ready within this long failed to start
READY_TIMEOUT = 30.0
#: restart backoff: the first delay, doubling up to the last
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 10.0
#: a worker that ran this long was healthy: its slot's backoff starts over
STABLE_AFTER = 10.0
#: after the drain timeout, how long the supervisor waits before SIGKILL
KILL_GRACE = 10.0
#: supervisor -> worker: SIGTERM drains, this one stops at once
STOP_NOW = signal.SIGUSR2
_HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD)


def store_kind(config: Config) -> str:
    """``local``, ``shm`` (also for ``auto``) or ``redis`` (a URL)."""
    if "://" in config.quota_store:
        return "redis"
    return "local" if config.quota_store == "local" else "shm"


def check_quota_store(config: Config) -> None:
    """Refuse a store that cannot keep the promise: ``local`` keeps each
    worker's quota to itself, so N workers would hand out N quotas; a Redis
    URL that redis-py cannot read."""
    if store_kind(config) == "redis":
        from elbasy.redis_store import connect, redact

        try:
            connect(config.quota_store).close()
        except ValueError as exc:
            why = str(exc).replace(config.quota_store, redact(config.quota_store))
            raise StartupError(f"--quota-store: {why}") from None
        return
    count = worker_count(config.workers)
    if config.quota_store == "local" and count > 1:
        raise StartupError(
            f"--quota-store local keeps each worker's quota to itself, so {count} workers "
            "would hand out each account's quota "
            f"{count} times; use --quota-store shm (the default) with more than one worker"
        )


def make_shared(config: Config) -> Any:
    """What every worker's quota store shares, made once before the first fork.

    The shared-memory quota table (``--quota-store shm``, and ``auto``): one
    for the supervisor's lifetime, so a restarted worker and a reload's new
    workers find every account's clocks and learned facts as they were.
    None with ``--quota-store local`` (one worker keeps its own quota).
    """
    if config.quota_store == "local":
        return None
    if store_kind(config) == "redis":
        from elbasy.redis_store import RedisShared, check_reachable

        shared = RedisShared(config.quota_store, timeout=config.quota_redis_timeout)
        try:
            version = check_reachable(shared)
        except ValueError as exc:
            raise StartupError(f"--quota-store: {exc}") from None
        except ConnectionError as exc:
            # a proxy that refused to start while Redis is down would fail every
            # request it carries: it starts on this machine's share instead
            version = ""
            log.warning(
                "quota store: cannot reach %s now; starting on this machine's share "
                "of 1/%d of each account, and sharing through Redis once it answers",
                exc,
                config.quota_instances,
            )
        from elbasy.shm import ShmTable

        # the machine's share while Redis is down, one table for all its workers
        table = ShmTable(config.quota_capacity, facts=config.quota_capacity)
        log.warning(
            "quota in Redis %s at %s, shared by every machine; no worker waits for it: "
            "an answer later than %g s and this machine keeps to a share of 1/%d of "
            "each account (a table in shared memory, %.1f MiB) until Redis answers",
            version or "(not reached yet)",
            shared.redacted(),
            shared.timeout,
            config.quota_instances,
            table.size / (1 << 20),
        )
        return RedisShared(shared.url, shared.timeout, table)
    from elbasy.shm import ShmTable

    # facts: a plan per bucket, a tier per account and the GraphQL shapes
    table = ShmTable(config.quota_capacity, facts=config.quota_capacity)
    log.info(
        "quota table in shared memory: %d buckets of %d bytes (%.1f MiB)",
        table.capacity,
        table.bytes_per_bucket,
        table.size / (1 << 20),
    )
    return table


def on_worker_gone(shared: Any, slot: int) -> None:
    """A worker that held ``slot`` was reaped: the units it had queued leave
    every bucket (its held requests will never depart), and the slot is free."""
    table = getattr(shared, "table", shared)  # Redis: the table of its local share
    if table is None or not hasattr(table, "release_slot"):
        return  # no store: nothing shared; in Redis a worker's units expire with its records
    released = table.release_slot(slot)
    if released:
        log.info("worker slot %d: its queued units left %d buckets", slot, released)


@dataclass
class Child:
    pid: int
    slot: int
    index: int  # which of its generation's listeners it polls (0..N-1)
    generation: int
    config: Config
    started: float
    ready_r: int | None  # the ready pipe, until the worker has said how its start went
    ready: bool = False
    draining: bool = False
    error: str = ""


def describe(status: int) -> str:
    """How a reaped process ended, in words: ``killed by SIGKILL``, ``exited with status 1``."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"killed by {name}"
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    return f"ended (status {status})"


class Supervisor:
    """Runs the workers of one elbasy until SIGTERM or Ctrl-C (:meth:`run`)."""

    def __init__(self, config: Config, reload_config: Callable[[], Config]) -> None:
        self.config = config
        self.reload_config = reload_config
        # who may use the proxy, read at start and on each reload (elbasy.access);
        # a restarted worker takes its generation's
        self.access: Access | None = None
        self.reload_access: Access | None = None
        # one SO_REUSEPORT listener per worker index, kept open here for the
        # supervisor's lifetime: a restarted or reloaded worker takes over the
        # same socket, so what waits in its accept queue is never reset
        self.socks: list[socket.socket] = []
        # each worker index's --reverse and --transparent listeners (site_listeners),
        # one of each one's group, kept the same way (a reload cannot change them:
        # only their count grows)
        self.rsocks: list[list[socket.socket]] = []
        self.listener_cert = ""  # --listen-tls: the certificate file clients trust
        self.shared: Any = None
        self.metrics: MetricsMemory | None = None
        self.metrics_listener: MetricsListener | None = None
        self.ca_file: str | None = None  # the CA's certificate, when elbasy intercepts
        self.children: dict[int, Child] = {}
        self.generation = 0
        self.phase = "starting"  # then "running", then "stopping"
        self.startup_error: str | None = None
        self.ready_deadline = 0.0
        # (when, slot, listener index) of crashed workers
        self.restarts: list[tuple[float, int, int]] = []
        self.backoff: dict[int, float] = {}
        self.interrupts = 0
        self.kill_at: float | None = None
        # a reload under way: its generation, config, socket (if the address moved), deadline
        self.reload_gen: int | None = None
        self.reload_cfg: Config | None = None
        # a reload's listeners: a new group (a new address) or the sockets it
        # adds to the running group (more workers); kept only if it commits
        self.reload_socks: list[socket.socket] = []
        self.reload_rsocks: list[list[socket.socket]] = []
        self.reload_moves = False  # reload_socks replace the group (a new address)
        self.reload_deadline = 0.0
        self._wake_r = self._wake_w = -1
        self.pid = os.getpid()

    # ---- the main loop ----------------------------------------------------------------

    def run(self) -> int:
        """Start the workers and serve until told to stop; the exit status.

        Raises StartupError (one line) when elbasy cannot start: the port is
        taken, the CA is unusable, or a worker failed to start.
        """
        self.pid = os.getpid()
        limit = raise_fd_limit()
        log.info("fd limit %d", limit)
        count = worker_count(self.config.workers)
        self.socks = listen_group(self.config.listen_host, self.config.listen_port, count)
        try:
            self.rsocks = listen_sites(self.config, count, self.socks[0].getsockname()[:2])
            self.access = access_of(self.config)
            self._warn_if_open(self.socks[0], self.access)
            for sock in self.rsocks[0][len(self.config.reverse) :]:
                host, port = sock.getsockname()[:2]
                warn_if_transparent_open(host, format_hostport(host, port), self.access)
            check_quota_store(self.config)
            self.ca_file = prepare_ca(self.config)
            if self.config.listen_tls is not None:
                # made (or read) once here, so workers forked after only read it
                self.listener_cert = listener_tls_pem(self.config)[2]
            self.shared = make_shared(self.config)
            # every worker's counters, for /metrics on any of them
            self.metrics = MetricsMemory(SLOTS)
            self._listen_metrics()
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_w, False)
            os.set_blocking(self._wake_r, False)
            previous = {sig: signal.signal(sig, _noop) for sig in _HANDLED}
            old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
            try:
                for index in range(count):
                    self._spawn(self._free_slot(), index, self.config, self.access, self.socks, 0)
                self.ready_deadline = time.monotonic() + READY_TIMEOUT
                self._serve()
            finally:
                signal.set_wakeup_fd(old_wakeup)
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        finally:
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            for sock in self._all_socks():
                sock.close()
            if self.metrics_listener is not None:
                self.metrics_listener.close()
        if self.startup_error is not None:
            raise StartupError(self.startup_error)
        log.info("stopped")
        return 0

    def _all_socks(self) -> list[socket.socket]:
        """Every listening socket the supervisor holds: the proxy's and the --reverse ones."""
        reverse = [sock for row in (*self.rsocks, *self.reload_rsocks) for sock in row]
        return [*self.socks, *self.reload_socks, *reverse]

    @staticmethod
    def _warn_if_open(sock: socket.socket, access: Access) -> None:
        """A WARNING when the proxy listens beyond loopback and asks nothing of clients."""
        host, port = sock.getsockname()[:2]
        warn_if_open(host, format_hostport(host, port), access)

    def _listen_metrics(self) -> None:
        """``--metrics-listen``: the supervisor's own /metrics, read from the shared memory."""
        where = self.config.metrics_listen
        if where is None or self.metrics is None:
            return
        memory, top = self.metrics, self.config.metrics_top_accounts
        host, port = parse_listen(where)
        try:
            self.metrics_listener = MetricsListener(
                host, port, lambda: exposition(InstanceView(memory), top)
            )
        except OSError as exc:
            raise bind_error("--metrics-listen", host, port, exc) from None
        self.metrics_listener.start()
        log.info("metrics on http://%s/metrics", format_hostport(*self.metrics_listener.address))

    def _serve(self) -> None:
        while self.children or self.phase != "stopping":
            fds = [self._wake_r, *(c.ready_r for c in self.children.values() if c.ready_r)]
            try:
                readable, _, _ = select.select(fds, [], [], self._timeout())
            except InterruptedError:  # pragma: no cover (PEP 475 retries)
                readable = []
            for fd in readable:
                if fd == self._wake_r:
                    self._signals()
                else:
                    self._ready_message(fd)
            self._reap()
            self._due()

    def _timeout(self) -> float:
        now = time.monotonic()
        when = [now + 1.0]
        when += [t for t, _, _ in self.restarts]
        if self.kill_at is not None:
            when.append(self.kill_at)
        return max(0.0, min(when) - now)

    def _signals(self) -> None:
        try:
            data = os.read(self._wake_r, 512)
        except BlockingIOError:
            return
        for signum in data:
            if signum == signal.SIGTERM:
                self._stop(drain=True)
            elif signum == signal.SIGINT:
                self.interrupts += 1
                self._stop(drain=self.interrupts == 1)
            elif signum == signal.SIGHUP:
                self._reload()
            elif signum == signal.SIGUSR1:
                reopen_log_file()
                self._tell_all(signal.SIGUSR1)
                log.info("log files reopened")

    def _due(self) -> None:
        now = time.monotonic()
        if self.phase == "starting":
            if self.startup_error is None and now > self.ready_deadline:
                self._fail_startup(f"the workers were not ready within {READY_TIMEOUT:g} s")
            elif self.children and all(c.ready for c in self.children.values()):
                self._started()
        if self.reload_gen is not None:
            new = [c for c in self.children.values() if c.generation == self.reload_gen]
            if new and all(c.ready for c in new):
                self._commit_reload()
            elif now > self.reload_deadline:
                self._abort_reload(f"the new workers were not ready within {READY_TIMEOUT:g} s")
        if self.restarts and self.phase == "running":
            for when, slot, index in sorted(self.restarts):
                if when <= now:
                    self.restarts.remove((when, slot, index))
                    self._spawn(slot, index, self.config, self.access, self.socks, self.generation)
        if self.kill_at is not None and now >= self.kill_at:
            for c in self.children.values():
                log.error("worker %d (pid %d) did not finish its drain: killing it", c.slot, c.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(c.pid, signal.SIGKILL)
            self.kill_at = None

    # ---- workers ----------------------------------------------------------------------

    def _free_slot(self) -> int:
        taken = {c.slot for c in self.children.values()} | {s for _, s, _ in self.restarts}
        for slot in range(SLOTS):
            if slot not in taken:
                return slot
        raise StartupError(f"no free worker slot (all {SLOTS} are taken)")

    def _spawn(
        self,
        slot: int,
        index: int,
        config: Config,
        access: Access | None,
        socks: list[socket.socket],
        generation: int,
    ) -> Child:
        ready_r, ready_w = os.pipe()
        # no signal may reach the child before it has its own handlers
        # (the inherited ones would write to the supervisor's wake-up pipe)
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover (the worker process)
                os.close(ready_r)
                rsocks = [*self.rsocks, *self.reload_rsocks][index]
                self._become_worker(slot, config, access, socks[index], rsocks, ready_w)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(ready_w)
        child = Child(pid, slot, index, generation, config, time.monotonic(), ready_r)
        self.children[pid] = child
        log.debug("worker %d started (pid %d)", slot, pid)
        return child

    def _become_worker(
        self,
        slot: int,
        config: Config,
        access: Access | None,
        sock: socket.socket,
        rsocks: list[socket.socket],
        ready_w: int,
    ) -> NoReturn:
        """The forked child: build the Worker, say it is ready, serve; never returns."""
        code = 1
        worker: Worker | None = None
        try:
            signal.set_wakeup_fd(-1)
            for fd in (self._wake_r, self._wake_w, *self._ready_fds()):
                with contextlib.suppress(OSError):
                    os.close(fd)
            for other in self._all_socks():
                if other is not sock and all(other is not mine for mine in rsocks):
                    other.close()
            if self.metrics_listener is not None:
                self.metrics_listener.forget()
            for sig in (signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)  # only the supervisor's word counts
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, _noop)  # until the worker exists (below)
            signal.signal(STOP_NOW, _noop)
            signal.signal(signal.SIGUSR1, lambda s, f: reopen_log_file())
            _die_with(self.pid)
            configure(config.log_level, config.log_format, config.log_file, config.access_log)
            try:
                worker = Worker(
                    config,
                    sock=sock,
                    slot=slot,
                    shared=self.shared,
                    metrics=self.metrics,
                    access=access,
                    site_socks=rsocks,
                )
            except StartupError as e:
                os.write(ready_w, b"E" + str(e).encode())
                os._exit(3)
            w = worker
            signal.signal(signal.SIGTERM, lambda s, f: w.drain(config.drain_timeout))
            signal.signal(STOP_NOW, lambda s, f: w.stop())
            signal.set_wakeup_fd(worker.wakeup_fd, warn_on_full_buffer=False)
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            os.write(ready_w, b"R")
            os.close(ready_w)
            worker.serve()
            code = 0
        except BaseException as exc:
            with contextlib.suppress(BaseException):
                log.error("worker %d failed: %s", slot, exc, exc_info=exc)
                os.write(ready_w, b"E" + f"worker {slot} failed: {exc}".encode())
        finally:
            with contextlib.suppress(BaseException):
                if worker is not None:
                    worker.close()
                logging.shutdown()
            os._exit(code)

    def _ready_fds(self) -> list[int]:
        return [c.ready_r for c in self.children.values() if c.ready_r is not None]

    def _ready_message(self, fd: int) -> None:
        child = next((c for c in self.children.values() if c.ready_r == fd), None)
        try:
            data = os.read(fd, 4096)
        except OSError:
            data = b""
        if child is None:
            return
        if data.startswith(b"R"):
            child.ready = True
        elif data.startswith(b"E"):
            child.error = data[1:].decode("utf-8", "replace")
        os.close(fd)
        child.ready_r = None

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            if child.ready_r is not None:
                os.close(child.ready_r)
                child.ready_r = None
            on_worker_gone(self.shared, child.slot)
            if self.metrics is not None:
                # its connections no longer count against the instance's limits
                self.metrics.forget_connections(child.slot)
            self._gone(child, status)

    def _gone(self, child: Child, status: int) -> None:
        how = describe(status)
        if child.draining or self.phase == "stopping":
            log.info("worker %d (pid %d) %s", child.slot, child.pid, how)
            return
        why = child.error or f"worker {child.slot} (pid {child.pid}) {how} before it was ready"
        if self.phase == "starting":
            self._fail_startup(why)
            return
        if not child.ready and child.generation == self.reload_gen:
            self._abort_reload(why)
            return
        ran = time.monotonic() - child.started
        if ran >= STABLE_AFTER:
            self.backoff[child.slot] = BACKOFF_FIRST
        delay = self.backoff.get(child.slot, BACKOFF_FIRST)
        self.backoff[child.slot] = min(delay * 2, BACKOFF_MAX)
        log.warning(
            "worker %d (pid %d) %s; restarting in %.1f s", child.slot, child.pid, how, delay
        )
        self.restarts.append((time.monotonic() + delay, child.slot, child.index))

    def _tell_all(self, sig: int, generation: int | None = None) -> None:
        for c in list(self.children.values()):
            if generation is None or c.generation == generation:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(c.pid, sig)

    # ---- start, stop, reload ----------------------------------------------------------

    def _started(self) -> None:
        self.phase = "running"
        host, port = self.socks[0].getsockname()[:2]
        # each --reverse's and --transparent's line before the banner scripts wait for
        reverse = len(self.config.reverse)
        for rule, sock in zip(self.config.reverse, self.rsocks[0][:reverse], strict=True):
            rhost, rport = sock.getsockname()[:2]
            reverse_banner(rhost, rport, rule.origin)
        transparent = self.rsocks[0][reverse:][: len(self.config.transparent)]
        for sock in transparent:
            transparent_banner(*sock.getsockname()[:2])
        if self.config.listen_tls is not None:
            thost, tport = self.rsocks[0][-1].getsockname()[:2]
            tls_listener_banner(thost, tport, self.listener_cert)
        startup_banner(__version__, host, port)
        startup_next(proxy_url(host, port, socket.gethostname), self.ca_file)
        pids = ", ".join(str(c.pid) for c in self.children.values())
        log.info("%d worker(s) ready (pids %s)", len(self.children), pids)
        intercept = intercepted_hosts(self.config, self.config.ruleset())
        if intercept:
            # the first hosts, to fit a terminal (`elbasy rules show ID` lists a rule's)
            log.info(
                "intercepting %d host%s: %s",
                len(intercept),
                "" if len(intercept) == 1 else "s",
                some_hosts(intercept, 45),
            )

    def _fail_startup(self, why: str) -> None:
        self.startup_error = why
        self.phase = "stopping"
        self._tell_all(STOP_NOW)
        for c in self.children.values():
            c.draining = True

    def _stop(self, drain: bool) -> None:
        first = self.phase != "stopping"
        self.phase = "stopping"
        self.restarts.clear()
        for c in self.children.values():
            c.draining = True
        if drain:
            if first:
                log.info(
                    "draining: %d worker(s) finish their requests within %g s",
                    len(self.children),
                    self.config.drain_timeout,
                )
                self._tell_all(signal.SIGTERM)
                self.kill_at = time.monotonic() + self.config.drain_timeout + KILL_GRACE
        else:
            log.info("stopping now")
            self._tell_all(STOP_NOW)

    def _reload(self) -> None:
        if self.phase != "running":
            log.warning("SIGHUP while %s: not reloading", self.phase)
            return
        if self.reload_gen is not None:
            log.warning("SIGHUP: a reload is already under way")
            return
        try:
            new = self.reload_config()
        except ConfigError as e:
            log.error("reload failed, the running workers go on: %s", e)
            return
        socks: list[socket.socket] = []
        rsocks: list[list[socket.socket]] = []
        moves = (new.listen_host, new.listen_port) != (
            self.config.listen_host,
            self.config.listen_port,
        )
        try:
            for path in (new.log_file, access_log_file(new.access_log)):
                if path:
                    with open(path, "a", encoding="utf-8"):
                        pass
            access = access_of(new)
            check_quota_store(new)
            if store_kind(new) != store_kind(self.config) or (
                store_kind(new) == "redis" and new.quota_store != self.config.quota_store
            ):
                raise StartupError("a reload cannot change --quota-store; restart elbasy")
            if new.reverse != self.config.reverse:
                raise StartupError("a reload cannot change --reverse; restart elbasy")
            if new.transparent != self.config.transparent:
                raise StartupError("a reload cannot change --transparent; restart elbasy")
            if (new.listen_tls, new.tls_cert, new.tls_key) != (
                self.config.listen_tls,
                self.config.tls_cert,
                self.config.tls_key,
            ):
                raise StartupError("a reload cannot change --listen-tls; restart elbasy")
            table = getattr(self.shared, "table", self.shared)  # Redis: its share's table
            capacity = getattr(table, "capacity", None)
            if capacity is not None and new.quota_capacity != capacity:
                log.warning(
                    "reload: the quota table keeps its %d buckets until a restart", capacity
                )
            prepare_ca(new)
            count = worker_count(new.workers)
            taken = len(self.children) + len(self.restarts)
            if taken + count > SLOTS:
                raise StartupError(
                    f"no room for {count} more workers ({taken} of {SLOTS} slots are taken: "
                    "the last reload's workers are still draining)"
                )
            if moves:
                # the probe would find this instance's own listeners on their port
                # (127.0.0.1:P to 0.0.0.0:P): only a new port is probed
                own_port = self.socks[0].getsockname()[1]
                socks = listen_group(
                    new.listen_host, new.listen_port, count, probe=new.listen_port != own_port
                )
            else:
                host, port = self.socks[0].getsockname()[:2]
                while len(self.socks) + len(socks) < count:
                    socks.append(listen(host, port, reuseport=True))
            # more workers: each --reverse group grows by as many
            where = [sock.getsockname()[:2] for sock in self.rsocks[0]] if self.rsocks else []
            while len(self.rsocks) + len(rsocks) < count:
                rsocks.append([])
                for host, port in where:
                    rsocks[-1].append(listen(host, port, reuseport=True))
        except (StartupError, OSError) as e:
            for sock in [*socks, *(sock for row in rsocks for sock in row)]:
                sock.close()
            log.error("reload failed, the running workers go on: %s", e)
            return
        self._warn_if_open((socks if moves else self.socks)[0], access)
        self.reload_gen = self.generation + 1
        self.reload_cfg = new
        self.reload_access = access
        self.reload_socks = socks
        self.reload_rsocks = rsocks
        self.reload_moves = moves
        self.reload_deadline = time.monotonic() + READY_TIMEOUT
        listeners = socks if moves else [*self.socks, *socks]
        for index in range(count):
            self._spawn(self._free_slot(), index, new, access, listeners, self.reload_gen)
        log.info("reloading: starting %d new worker(s)", count)

    def _commit_reload(self) -> None:
        assert self.reload_cfg is not None and self.reload_gen is not None
        old = [c for c in self.children.values() if c.generation != self.reload_gen]
        for c in old:
            c.draining = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.pid, signal.SIGTERM)
        self.restarts.clear()  # the old generation's crashed slots are not restarted
        self.config = self.reload_cfg
        self.access = self.reload_access
        self.generation = self.reload_gen
        count = worker_count(self.config.workers)
        if self.reload_moves:
            # the old group stays open in the draining workers until they exit
            for sock in self.socks:
                sock.close()
            self.socks = self.reload_socks
        else:
            self.socks += self.reload_socks
            if len(self.socks) > count:
                # fewer workers: their listeners leave the group; what was queued
                # in them when the last old worker exits is reset by the kernel
                log.warning(
                    "reload: %d listening socket(s) retired with the workers that polled them",
                    len(self.socks) - count,
                )
                for sock in self.socks[count:]:
                    sock.close()
                del self.socks[count:]
        self.rsocks += self.reload_rsocks
        for row in self.rsocks[count:]:
            for sock in row:
                sock.close()
        del self.rsocks[count:]
        self.reload_gen = self.reload_cfg = None
        self.reload_access = None
        self.reload_socks = []
        self.reload_rsocks = []
        with contextlib.suppress(OSError):
            configure(
                self.config.log_level,
                self.config.log_format,
                self.config.log_file,
                self.config.access_log,
            )
        new = [c for c in self.children.values() if c.generation == self.generation]
        log.info(
            "reloaded: %d new worker(s) ready (pids %s); %d old one(s) draining",
            len(new),
            ", ".join(str(c.pid) for c in new),
            len(old),
        )

    def _abort_reload(self, why: str) -> None:
        log.error("reload failed, the running workers go on: %s", why)
        for c in self.children.values():
            if c.generation == self.reload_gen:
                c.draining = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(c.pid, STOP_NOW)
        for sock in [*self.reload_socks, *(sock for row in self.reload_rsocks for sock in row)]:
            sock.close()
        self.reload_gen = self.reload_cfg = None
        self.reload_access = None
        self.reload_socks = []
        self.reload_rsocks = []


def _noop(signum: int, frame: object) -> None:
    """A handler that does nothing: the wake-up fd carries the signal's number."""


def _die_with(parent: int) -> None:
    """Ask for SIGTERM (a drain) when the supervisor dies, so no worker is left behind."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover (not Linux)
        return
    if os.getppid() != parent:  # it died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


def run(config: Config, reload_config: Callable[[], Config]) -> int:
    """Run elbasy's supervisor and workers until SIGTERM or Ctrl-C; the exit status."""
    return Supervisor(config, reload_config).run()
