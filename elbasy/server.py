"""Compose one worker: listener, resolver, policy and the loop, then serve.

This is the only module that sees both planes: it builds the policy objects
(plain Python) and hands them to the Cython loop. The process-level
concerns (forking workers, signals, the fd limit, opening the listening
socket once) are the supervisor's (:mod:`elbasy.supervisor`); the helpers
it needs for them live here.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import logging
import resource
import socket
import time
from pathlib import Path
from typing import Any

from elbasy import __version__
from elbasy._loop import Loop
from elbasy.access import Access, AccessError, load_access
from elbasy.config import Config, format_hostport, parse_listen
from elbasy.destinations import Destinations
from elbasy.logs import set_worker
from elbasy.metrics import MetricsMemory, WorkerMetrics
from elbasy.pacing import Pacer
from elbasy.pages import LOOP_PAGES
from elbasy.policy import Policy, reverse_site
from elbasy.quota import LocalStore, Safety
from elbasy.resolver import Resolver
from elbasy.rules import RuleSet
from elbasy.status import document as status_document
from elbasy.status import proxy_url
from elbasy.verdicts import TLSListener, Transparent

log = logging.getLogger("elbasy")

# TCP_DEFER_ACCEPT: the kernel completes accept only once the client has
# sent its first bytes, so the loop can read the head right away.
DEFER_ACCEPT_SECONDS = 1


def raise_fd_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def listen(
    host: str, port: int, reuseport: bool = False, option: str = "--listen"
) -> socket.socket:
    """The listening socket, non-blocking; raises StartupError (one line) when it cannot bind.

    ``reuseport``: one of a group bound to one port (SO_REUSEPORT), among which
    the kernel spreads new connections by their addresses (:func:`listen_group`).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        _listen_on(sock, host, port)
    except OSError as e:
        sock.close()
        raise bind_error(option, host, port, e) from None
    return sock


def bind_error(option: str, host: str, port: int, exc: OSError) -> StartupError:
    """The one line for a listener ``option`` (``--listen``, ``--metrics-listen``) that
    could not bind ``host:port``: what went wrong and what to try instead."""
    where = format_hostport(host, port)
    shown = format_hostport(host, 0)[:-1]  # "127.0.0.1:", "[::1]:"
    if exc.errno == errno.EADDRINUSE:
        why = f"address already in use (try {option} {shown}PORT)"
    elif exc.errno == errno.EADDRNOTAVAIL:
        why = (
            f"this host has no address {host} "
            f"(try {option} 127.0.0.1:{port}, or 0.0.0.0:{port} for every address)"
        )
    elif exc.errno == errno.EACCES and 0 < port < 1024:
        why = (
            f"permission denied: ports below 1024 need root or CAP_NET_BIND_SERVICE "
            f"(try {option} {shown}8080)"
        )
    else:
        text = exc.strerror or str(exc)
        why = text[:1].lower() + text[1:]
    suffix = "" if option == "--listen" else f" for {option}"
    return ListenError(f"cannot listen on {where}{suffix}: {why}")


def probe_free(host: str, port: int, option: str = "--listen") -> None:
    """Raise StartupError (one line, naming ``option``) when ``host:port`` is taken.

    A bind without SO_REUSEPORT (then closed, never listening): a SO_REUSEPORT
    listener would otherwise join the group of whatever already listens there
    with SO_REUSEPORT (another elbasy of the same user, say) and silently take
    half its connections. SO_REUSEADDR as the listeners have it, so connections
    of a past run in TIME_WAIT do not count as taken. Port 0 is not probed: the
    kernel gives it a port nobody holds. Between the probe and the listeners'
    bind another SO_REUSEPORT listener could still slip in (two elbasys started
    on one port at the same instant): one start in a race, never a standing
    listener overlooked."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
        except OSError as e:
            raise bind_error(option, host, port, e) from None


def listen_group(
    host: str, port: int, count: int, option: str = "--listen", probe: bool = True
) -> list[socket.socket]:
    """``count`` SO_REUSEPORT listeners on one port (port 0: the first one's),
    one per worker; raises StartupError (naming ``option``), closing what it opened.
    ``probe``: first see that no one listens there already (:func:`probe_free`)."""
    if probe:
        probe_free(host, port, option)
    first = listen(host, port, reuseport=True, option=option)
    group = [first]
    try:
        port = first.getsockname()[1]
        while len(group) < count:
            group.append(listen(host, port, reuseport=True, option=option))
    except BaseException:
        for sock in group:
            sock.close()
        raise
    return group


def site_listeners(config: Config) -> list[tuple[str, str, int]]:
    """The listeners beside the proxy's whose connections carry a site: each
    ``--reverse``, each ``--transparent``, then ``--listen-tls``, as (option and
    value, host, port)."""
    out = [(f"--reverse {rule}", rule.listen_host, rule.listen_port) for rule in config.reverse]
    for where in config.transparent:
        out.append((f"--transparent {where}", *parse_listen(where)))
    if config.listen_tls is not None:
        out.append((f"--listen-tls {config.listen_tls}", *parse_listen(config.listen_tls)))
    return out


def listen_sites(config: Config, count: int, proxy: tuple[str, int]) -> list[list[socket.socket]]:
    """One SO_REUSEPORT group of ``count`` listeners per :func:`site_listeners` entry
    (as :func:`listen_group`), by worker: element ``i`` holds worker ``i``'s socket of
    each one, in their order. ``proxy``: the proxy's listening address. Raises
    StartupError (one line, naming the option), closing what it opened."""
    groups: list[list[socket.socket]] = []
    try:
        # the ports as given first (one of the proxy's or of another site's would
        # fail the probe as merely "in use"), then as bound (port 0's)
        check_own_ports(config, [(host, port) for _, host, port in site_listeners(config)], proxy)
        for what, host, port in site_listeners(config):
            try:
                groups.append(listen_group(host, port, count, what.split()[0]))
            except StartupError as e:
                raise type(e)(f"{what}: {e}") from None
        check_own_ports(config, [group[0].getsockname()[:2] for group in groups], proxy)
    except BaseException:
        for group in groups:
            for sock in group:
                sock.close()
        raise
    return (
        [list(row) for row in zip(*groups, strict=True)] if groups else [[] for _ in range(count)]
    )


def check_own_ports(
    config: Config, addresses: list[tuple[str, int]], proxy: tuple[str, int]
) -> None:
    """Refuse a --reverse or --transparent at ``addresses`` (each site's, in
    :func:`site_listeners` order; port 0: not yet known, not compared) where the
    proxy or another of them listens (an overlapping address, same port): their
    listeners would share one another's connections."""
    wild = ("0.0.0.0", "::")
    seen = [(proxy[0], proxy[1], "the proxy (--listen)")]
    for (this, _, _), (host, port) in zip(site_listeners(config), addresses, strict=True):
        for other_host, other_port, what in seen:
            overlaps = host == other_host or host in wild or other_host in wild
            if port and port == other_port and overlaps:
                raise StartupError(f"{this}: port {port} is taken by {what}")
        seen.append((host, port, this))


def _listen_on(sock: socket.socket, host: str, port: int) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_SECONDS)
    # accepted client sockets inherit TCP_NODELAY: small TLS records and
    # responses leave at once, without a setsockopt per connection
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)


class StartupError(Exception):
    """elbasy cannot start as configured; the message says why and what to do."""

    exit_code = 1


class ListenError(StartupError):
    """A listener cannot bind its address: a bad option, exit code 2 like the others."""

    exit_code = 2


def access_of(config: Config) -> Access:
    """Who may use the proxy (elbasy.access): the credentials read now, the client
    networks. Raises StartupError (one line) when the credentials cannot be read."""
    try:
        return load_access(config)
    except AccessError as e:
        raise StartupError(str(e)) from None


def intercepted_hosts(config: Config, rules: RuleSet) -> tuple[str, ...]:
    """--intercept globs, then the hosts of every enabled rule (each once, in order)."""
    return tuple(dict.fromkeys([*config.intercept, *(g.lower() for g in rules.intercept_globs())]))


def make_store(config: Config, shared: Any, slot: int) -> Any:
    """The quota store of one worker.

    ``shared`` is what :func:`elbasy.supervisor.make_shared` made before the
    workers were forked (None: no shared store, so each worker keeps its
    own quota in :class:`LocalStore`); ``slot`` is this worker's number,
    0..31, unique among the live workers.
    """
    safety = Safety(**config.safety_settings())
    if shared is None:
        return LocalStore(safety)
    from elbasy.redis_store import RedisShared, RedisStore

    if isinstance(shared, RedisShared):
        from elbasy.config import worker_count
        from elbasy.fleet_store import FleetStore

        # a step's answer may take the timeout; beyond it a local share of every
        # account answers
        # the settings of this worker's config (a reload's new workers take new ones)
        timeout = config.quota_redis_timeout
        if shared.table is not None:
            from elbasy.shm import ShmStore

            # the machine's share, in one table for all its workers
            local: Any = ShmStore(shared.table, slot, safety)
            share = 1.0 / config.quota_instances
        else:
            local, share = (
                LocalStore(safety),
                1.0 / (config.quota_instances * worker_count(config.workers)),
            )
        from elbasy.piped_store import PipedStore

        fleet = FleetStore(
            # other machines' refunds wake the loop through the local share's fd
            lambda: RedisStore(shared.url, safety, timeout=timeout, wake_fd=local.fileno()),
            local,
            share=share,
        )
        # the loop's steps go over its own socket, never waited on (elbasy.piped_store)
        return PipedStore(fleet, timeout=timeout)
    from elbasy.shm import ShmStore

    return ShmStore(shared, slot, safety)


def listener_names(host: str) -> list[str]:
    """The names a --listen-tls certificate of elbasy's own covers: its address
    (127.0.0.1 for a wildcard one), ``localhost`` and this host's name."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    return [shown, "localhost", socket.gethostname()]


def listener_tls_pem(config: Config) -> tuple[bytes, bytes, str]:
    """The --listen-tls certificate and key, and the file clients trust: the
    operator's --tls-cert, or the one elbasy keeps in its data dir (made the first
    time; the supervisor asks first, so workers only read it). Raises StartupError."""
    from elbasy.ca import CAError, default_data_dir
    from elbasy.ca.listener import listener_certificate, read_listener_certificate

    if (config.tls_cert is None) != (config.tls_key is None):
        raise ListenError("--listen-tls: --tls-cert and --tls-key go together")
    try:
        if config.tls_cert is not None and config.tls_key is not None:
            cert, key = read_listener_certificate(config.tls_cert, config.tls_key)
            return cert, key, config.tls_cert
        assert config.listen_tls is not None
        where = Path(config.data_dir) if config.data_dir else default_data_dir()
        host = parse_listen(config.listen_tls)[0]
        cert, key, path = listener_certificate(where, listener_names(host))
        return cert, key, str(path)
    except CAError as e:
        raise StartupError(str(e)) from None


def prepare_ca(config: Config) -> str | None:
    """Load the CA, or make it on the first run, before any worker starts; the
    path of its certificate (None: elbasy intercepts nothing).

    The supervisor calls it once, so workers forked after it only ever
    load the CA and never race to create it. Raises StartupError.
    """
    intercept = intercepted_hosts(config, config.ruleset())
    if not intercept:
        return None
    server, client, ca_file = interception(config, intercept)
    server.close()
    client.close()
    return ca_file


def interception(config: Config, intercept: tuple[str, ...]) -> tuple[Any, Any, str]:
    """The TLS halves for --intercept: (server side, upstream side, CA file).

    Loads the CA from the data dir, or makes it on the first run, and
    refuses to start when it cannot issue for every intercepted host (its
    name constraints predate a new --intercept glob, or it is near expiry),
    naming the command that makes a new one.
    """
    from elbasy.ca import CAError, CertificateAuthority, default_data_dir, storage
    from elbasy.tls import ClientTLS, MintLimiter, ServerTLS, TLSError

    def now() -> dt.datetime:
        return dt.datetime.now(dt.UTC)

    where = Path(config.data_dir) if config.data_dir else default_data_dir()
    try:
        authority = CertificateAuthority.load_or_create(
            where, intercept, now=now(), unconstrained=config.unconstrained_ca
        )
    except CAError as e:
        raise StartupError(str(e)) from None
    # the command it names asks for the user's own globs: ca init adds the rules' hosts
    problem = authority.needs_new_ca(intercept, now(), asked=config.intercept)
    if problem is not None:
        raise StartupError(problem)
    if authority.unconstrained:
        log.warning(
            "the CA in %s is UNCONSTRAINED: its key can impersonate any site", authority.data_dir
        )
    try:
        client = ClientTLS(config.upstream_ca)
    except TLSError as e:
        raise StartupError(str(e)) from None
    if client.trust.source == "none" and config.upstream_ca is None:
        log.warning("upstream CAs: none found (no system bundle, no certifi); set SSL_CERT_FILE")
    else:
        log.debug("upstream CAs: %s", client.trust.describe())
    authority.leaf_files = config.leaf_cache_files
    storage.prune_leaves(authority.leaves_dir, authority.leaf_files)  # a lower cap than before
    limiter = MintLimiter(time.monotonic, config.leaf_mint_rate, config.leaf_mint_burst)
    server = ServerTLS(authority, now, intercept=intercept, limiter=limiter)
    return server, client, str(authority.cert_path)


def destinations(config: Config, address: tuple[str, int]) -> Destinations:
    """The destination rules of a worker listening on ``address``: its own
    addresses (and the supervisor's /metrics one) are never dialed."""
    rules = Destinations(
        config.allow_hosts,
        config.deny_hosts,
        config.allow_ports,
        config.allow_internal,
        own=[address],
    )
    if config.metrics_listen is not None:
        rules.add_own(*parse_listen(config.metrics_listen))
    return rules


class Worker:
    """One loop with its listener, resolver and policy; ``serve()`` runs it.

    ``policy_type`` builds the policy (a test may pass a subclass of
    :class:`Policy`). ``stop()`` may be called from any thread.

    In a worker process the supervisor passes the listening socket it
    opened for it (``sock``, one of a SO_REUSEPORT group, polled with
    EPOLLEXCLUSIVE while a reload's worker polls it too), the worker's
    ``slot`` and the ``shared`` quota state;
    without ``sock`` the worker opens its own listener (tests in one process).
    ``access``: who may use it, as the supervisor read it for the worker's
    generation (None: read here from ``config``).
    """

    def __init__(
        self,
        config: Config,
        policy_type: type[Policy] = Policy,
        *,
        sock: socket.socket | None = None,
        slot: int = 0,
        shared: Any = None,
        metrics: MetricsMemory | None = None,
        access: Access | None = None,
        site_socks: list[socket.socket] | None = None,
    ) -> None:
        self.config = config
        self.slot = slot
        self.metrics = WorkerMetrics(
            metrics,
            slot,
            top_accounts=config.metrics_top_accounts,
            started=time.time(),
        )
        set_worker(slot)  # its access lines name it
        self.sock = sock if sock is not None else listen(config.listen_host, config.listen_port)
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        if site_socks is None:
            try:
                site_socks = listen_sites(config, 1, self.address)[0]
            except BaseException:
                self.sock.close()
                raise
        # one socket per --reverse, then per --transparent, in their order (site_listeners)
        self.site_socks = site_socks
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.destinations = destinations(config, self.address)
        for rs in self.site_socks:
            self.destinations.add_own(*rs.getsockname()[:2])
        self.resolver = Resolver(
            time.monotonic,
            config.connect_to,
            metrics=self.metrics,
            destinations=self.destinations,
            timeout=config.dns_timeout,
        )
        self.server_tls: Any = None
        self.client_tls: Any = None
        self.listener_tls: Any = None
        self.ca_file: str | None = None
        try:
            rules = config.ruleset()
            self.intercept = intercepted_hosts(config, rules)
            self.pacer = Pacer(
                rules,
                make_store(config, shared, slot),
                wall=time.time,
                mono=time.monotonic,
                metrics=self.metrics,
                **config.pacer_settings(),
            )
            if self.intercept:
                self.server_tls, self.client_tls, self.ca_file = interception(
                    config, self.intercept
                )
                self.server_tls.on_mint = lambda: self.metrics.count("tls_leaf_mints")
                self.server_tls.on_refuse = lambda why: self.metrics.count(
                    "tls_leaf_refusals", (why,)
                )
            if config.listen_tls is not None:
                from elbasy.tls import ListenerTLS, TLSError

                cert, key, _ = listener_tls_pem(config)
                try:
                    self.listener_tls = ListenerTLS(cert, key)
                except TLSError as e:
                    raise StartupError(f"--listen-tls: {e}") from None
            sites = self._sites()
            self.policy = policy_type(self._stats, self.intercept, self.pacer)
            self.policy.access = access if access is not None else access_of(config)
            self.policy.status = self._status
            self.policy.destinations = self.destinations
            self.policy.proxy_url = proxy_url(self.address[0], self.address[1], socket.gethostname)
            if self.server_tls is not None:
                # the certificate its leaves chain to (never the key)
                self.policy.ca_pem = self.server_tls.authority.cert_pem
                self.policy.ca_file = self.ca_file
            self.loop = Loop(
                self.policy,
                self.resolver,
                self.sock.fileno(),
                self._wake_r.fileno(),
                **config.loop_settings(),
                server_tls=self.server_tls,
                client_tls=self.client_tls,
                listen_exclusive=sock is not None,
                # another worker's refund or place given back moves this one's lines
                quota_fd=self.pacer.store.fileno(),
                pages=LOOP_PAGES,
                counters=self.metrics.loop_counters,
                # the connection limits count every worker's connections
                instance_counts=self.metrics.instance.connections_of(slot),
                # --allow-clients is decided at accept, once per client address
                client_allowed=(
                    self.policy.client_allowed if self.policy.access.clients is not None else None
                ),
                sites=[
                    (rs.fileno(), site) for rs, site in zip(self.site_socks, sites, strict=True)
                ],
            )
            # the pacer moves held requests (a line that moved) through the loop
            self.pacer.wake = self.loop.wake
        except BaseException:
            self.close()
            raise

    def _sites(self) -> list[Any]:
        """Each --reverse listener's site (elbasy.verdicts.Reverse), then each
        --transparent one's (Transparent), in the order of ``site_socks``; an https
        target gets the verifying upstream TLS even when nothing is intercepted.
        Raises StartupError when the destination rules refuse a target."""
        config = self.config
        sites: list[Any] = []
        reverse_socks = self.site_socks[: len(config.reverse)]
        for rule, rs in zip(config.reverse, reverse_socks, strict=True):
            why = self.destinations.refusal(rule.host, rule.port, False)
            if why is not None:
                raise StartupError(f"--reverse {rule}: the destination rules refuse it ({why})")
            sites.append(reverse_site(rule, rs.getsockname()[:2]))
        transparent = self.site_socks[len(config.reverse) :][: len(config.transparent)]
        for ts in transparent:
            sites.append(Transparent(ts.getsockname()[:2], 443))
        if self.listener_tls is not None:
            ls = self.site_socks[-1]
            sites.append(TLSListener(ls.getsockname()[:2], self.listener_tls.new_ssl))
        if self.client_tls is None and any(rule.tls for rule in config.reverse):
            from elbasy.tls import ClientTLS, TLSError

            try:
                self.client_tls = ClientTLS(config.upstream_ca)
            except TLSError as e:
                raise StartupError(str(e)) from None
        return sites

    def _stats(self) -> dict[str, Any]:
        loop = getattr(self, "loop", None)
        stats: dict[str, Any] = loop.stats() if loop is not None else {}
        stats["worker"] = self.slot
        if self.server_tls is not None:
            stats.setdefault("tls", {}).update(self.server_tls.stats())
        pacer = getattr(self, "pacer", None)
        if pacer is not None:
            stats["pacing"] = {**pacer.counters, **pacer.lateness()}
            stats["quota"] = pacer.store.stats()
        return stats

    def _status(self) -> dict[str, Any]:
        """``/status.json``: the whole instance, from the metrics memory (elbasy.status)."""
        host, port = self.address
        return status_document(
            self.metrics.read(),
            time.time(),
            version=__version__,
            proxy_url=proxy_url(host, port, socket.gethostname),
            rules=self.pacer.rules,
            top=self.config.metrics_top_accounts,
        )

    @property
    def wakeup_fd(self) -> int:
        """Where signal.set_wakeup_fd should write (wakes the loop)."""
        return self._wake_w.fileno()

    def serve(self) -> None:
        """Run the loop until stop(); then every connection it owned is closed."""
        self.loop.run()

    def stop(self) -> None:
        self.loop.stop()
        self._wake()

    def drain(self, seconds: float) -> None:
        """Finish what is in flight within ``seconds``, then leave serve() (Loop.drain)."""
        self.loop.drain(seconds)
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def close(self) -> None:
        self.resolver.close()
        for tls in (self.server_tls, self.client_tls, self.listener_tls):
            if tls is not None:
                tls.close()
        self.sock.close()
        for rs in self.site_socks:
            rs.close()
        self._wake_r.close()
        self._wake_w.close()
