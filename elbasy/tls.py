"""TLS for interception: the server contexts (one leaf per SAN, chosen by SNI in C),
the upstream client context, and OpenSSL's failures as elbasy's exceptions.

Over :mod:`elbasy._tls` (cffi, built from ``ext/tls_build.py``). This module makes
``SSL*`` objects and hands them out as integers; ``elbasy._loop``, linked to the
same OpenSSL, drives them (``SSL_do_handshake``, ``SSL_read``, ``SSL_write``,
``SSL_shutdown``, ``SSL_free``). Nothing here touches the stdlib :mod:`ssl`
module's objects, which may come from another OpenSSL copy.

Server side
===========

:class:`ServerTLS` owns a default ``SSL_CTX`` whose servername callback (C)
picks the leaf context by SNI, or by the CONNECT host when the client sent no
SNI, from a bounded C table keyed by SAN: the exact name first, then
``*.`` + the name without its first label. Python is called only on a miss
(:func:`elb_sni_miss`): it asks the :class:`~elbasy.ca.CertificateAuthority`
for the leaf, loads it into a new context and inserts it under the leaf's SAN,
so one miss for ``shop1.myshopify.com`` makes ``*.myshopify.com`` serve every
other shop without Python. Only names an intercept glob covers get a leaf
(:func:`elbasy.hostglob.covered`: one label per glob label, so
``n1.deep.myshopify.com`` is not covered by ``*.myshopify.com``); any other
SNI fails the handshake with an ``unrecognized_name`` alert before a key is
made. New leaves can be rate-limited (:class:`MintLimiter`: a token bucket per
client address and one for the worker); a leaf already in memory or on disk
is served regardless.
A table entry remembers its leaf's renewal time;
a hit on a stale entry counts as a miss, and the fresh leaf replaces it. When
the table is full the oldest inserted entry is dropped. Stale-ness is judged
against the wall clock unless :meth:`ServerTLS.set_time` pins the C side to
the injected clock's reading.

ALPN: ``http/1.1`` when the client offers it, otherwise no ALPN (an h2-only
client is not failed; it gets none). Session tickets and the session cache
belong to the default context, so resumption works across leaves.

Client side
===========

:class:`ClientTLS` verifies upstreams against the CAs :mod:`elbasy.trust`
finds (``SSL_CERT_FILE``/``SSL_CERT_DIR``, else the distro's bundle, else
certifi's) and an optional extra CA file (``--upstream-ca``),
with SNI for names, host or IP checks, ALPN ``http/1.1`` and a per-host
session cache in C.

Errors
======

:data:`ERRORS` maps OpenSSL (library, reason) codes to :class:`TLSError`
subclasses; a verify result other than OK is always a
:class:`CertificateVerifyError`. :func:`error_for` builds the exception after
a failed handshake.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Final

from elbasy._tls import ffi, lib
from elbasy.ca import CertificateAuthority, Leaf
from elbasy.errors import (
    CertificateVerifyError,
    HandshakeError,
    TLSConfigError,
    TLSError,
)
from elbasy.hostglob import covered
from elbasy.roots import Trust, upstream_trust
from elbasy.trust import CLOSED_AFTER_LEAF

__all__ = [
    "ERRORS",
    "CertificateVerifyError",
    "ClientTLS",
    "HandshakeError",
    "MintLimiter",
    "ServerTLS",
    "TLSConfigError",
    "TLSError",
    "error_for",
    "free_ssl",
    "openssl_library",
    "openssl_version",
]

log = logging.getLogger("elbasy")

DEFAULT_TABLE_SIZE: Final = 1024
DEFAULT_SESSION_CACHE: Final = 256
DEFAULT_MINT_RATE: Final = 60  # new leaves a minute, per client address
DEFAULT_MINT_BURST: Final = 20  # new leaves at once, per client address
#: the worker's own bucket holds this many clients' worth
GLOBAL_MINT_FACTOR: Final = 4
_MINT_CLIENTS: Final = 4096
_TEXT_CAP: Final = 512

_SSL: Final = lib.ERR_LIB_SSL

# (library, reason) -> exception class; (library, None) is that library's default.
ERRORS: Final[dict[tuple[int, int | None], type[TLSError]]] = {
    # the upstream's certificate failed a check (the verify result names which)
    (_SSL, lib.SSL_R_CERTIFICATE_VERIFY_FAILED): CertificateVerifyError,
    # the peer broke the handshake
    (_SSL, lib.SSL_R_NO_SHARED_CIPHER): HandshakeError,
    (_SSL, lib.SSL_R_WRONG_VERSION_NUMBER): HandshakeError,
    (_SSL, lib.SSL_R_UNSUPPORTED_PROTOCOL): HandshakeError,
    (_SSL, lib.SSL_R_VERSION_TOO_LOW): HandshakeError,
    (_SSL, lib.SSL_R_NO_PROTOCOLS_AVAILABLE): HandshakeError,
    (_SSL, lib.SSL_R_HTTP_REQUEST): HandshakeError,
    (_SSL, lib.SSL_R_HTTPS_PROXY_REQUEST): HandshakeError,
    (_SSL, lib.SSL_R_PACKET_LENGTH_TOO_LONG): HandshakeError,
    (_SSL, lib.SSL_R_RECORD_LENGTH_MISMATCH): HandshakeError,
    (_SSL, lib.SSL_R_BAD_PACKET_LENGTH): HandshakeError,
    (_SSL, lib.SSL_R_LENGTH_MISMATCH): HandshakeError,
    (_SSL, lib.SSL_R_UNEXPECTED_MESSAGE): HandshakeError,
    (_SSL, lib.SSL_R_UNEXPECTED_EOF_WHILE_READING): HandshakeError,
    (_SSL, lib.SSL_R_CALLBACK_FAILED): HandshakeError,
    (_SSL, lib.SSL_R_TLSV1_UNRECOGNIZED_NAME): HandshakeError,
    (_SSL, lib.SSL_R_TLSV1_ALERT_UNKNOWN_CA): HandshakeError,
    (_SSL, lib.SSL_R_SSLV3_ALERT_BAD_CERTIFICATE): HandshakeError,
    (_SSL, lib.SSL_R_SSLV3_ALERT_CERTIFICATE_UNKNOWN): HandshakeError,
    (_SSL, lib.SSL_R_SSLV3_ALERT_HANDSHAKE_FAILURE): HandshakeError,
    (_SSL, lib.SSL_R_TLSV1_ALERT_PROTOCOL_VERSION): HandshakeError,
    (_SSL, lib.SSL_R_TLSV1_ALERT_INTERNAL_ERROR): HandshakeError,
    (_SSL, lib.SSL_R_TLSV1_ALERT_DECODE_ERROR): HandshakeError,
    # ours: a context without a usable certificate or key
    (_SSL, lib.SSL_R_NO_CERTIFICATE_ASSIGNED): TLSConfigError,
    (_SSL, lib.SSL_R_NO_PRIVATE_KEY_ASSIGNED): TLSConfigError,
    (_SSL, lib.SSL_R_CA_MD_TOO_WEAK): TLSConfigError,
    (_SSL, lib.SSL_R_EE_KEY_TOO_SMALL): TLSConfigError,
    (lib.ERR_LIB_X509, lib.X509_R_KEY_VALUES_MISMATCH): TLSConfigError,
    (lib.ERR_LIB_PEM, lib.PEM_R_NO_START_LINE): TLSConfigError,
    (lib.ERR_LIB_PEM, lib.PEM_R_BAD_END_LINE): TLSConfigError,
    # library defaults
    (_SSL, None): HandshakeError,
    (lib.ERR_LIB_SYS, None): HandshakeError,  # a reset or EOF mid-handshake
    (lib.ERR_LIB_X509, None): TLSConfigError,
    (lib.ERR_LIB_PEM, None): TLSConfigError,
    (lib.ERR_LIB_EVP, None): TLSConfigError,
    (lib.ERR_LIB_ASN1, None): TLSConfigError,
    (lib.ERR_LIB_EC, None): TLSConfigError,
    (lib.ERR_LIB_BIO, None): TLSConfigError,
}


def openssl_version() -> str:
    """The version of the OpenSSL elbasy._tls is linked to."""
    return str(ffi.string(lib.OpenSSL_version(lib.OPENSSL_VERSION)).decode())


def openssl_library() -> str | None:
    """The file the running libssl was loaded from (the wheel's grafted copy or
    the system's), read from /proc/self/maps; None where that is not readable."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rstrip("\n").partition("/")[2]
                if path and os.path.basename(path).startswith("libssl"):
                    return "/" + path
    except OSError:
        return None
    return None


def _class_for(code: int) -> type[TLSError]:
    if code == 0:
        return HandshakeError
    library, reason = lib.ERR_GET_LIB(code), lib.ERR_GET_REASON(code)
    return ERRORS.get((library, reason)) or ERRORS.get((library, None)) or HandshakeError


def _failure(ssl: Any) -> tuple[int, int, str]:
    """(packed error code, verify result, text) for ``ssl`` (or NULL); clears the queue."""
    verify = ffi.new("long *")
    buf = ffi.new("char[]", _TEXT_CAP)
    code = lib.elb_ssl_failure(ssl, verify, buf, _TEXT_CAP)
    return int(code), int(verify[0]), ffi.string(buf).decode("utf-8", "replace")


def _config_error(what: str) -> TLSConfigError:
    """``what`` failed in OpenSSL: a TLSConfigError with the first queued reason."""
    code, _, text = _failure(ffi.NULL)
    if code == 0:
        text = "out of memory or an OpenSSL internal error"
    return TLSConfigError(f"{what}: {text}", reason=text, code=code)


def _ptr(ssl: int) -> Any:
    return ffi.cast("SSL *", ssl)


def error_for(ssl: int) -> TLSError:
    """The exception for a failed handshake on ``ssl``; call it right after the failure.

    Reads (and clears) OpenSSL's error queue. A verify result other than OK
    gives a :class:`CertificateVerifyError` naming the check ("certificate
    verify failed: hostname mismatch"); a leaf that could not be made gives
    the :class:`TLSConfigError` recorded then; otherwise :data:`ERRORS` picks
    the class from the first queued error.
    """
    p = _ptr(ssl)
    note = lib.elb_ssl_note(p)
    code, verify, text = _failure(p)
    if note != ffi.NULL:
        reason = ffi.string(note).decode("utf-8", "replace")
        return TLSConfigError(reason, reason=reason, code=code)
    if verify != lib.X509_V_OK:
        return CertificateVerifyError(
            text,
            reason=text.removeprefix("certificate verify failed: "),
            code=code,
            verify_result=verify,
        )
    cls = _class_for(code)
    return cls(f"TLS handshake failed: {text}", reason=text, code=code)


def free_ssl(ssl: int) -> None:
    """SSL_free (the loop frees its SSLs itself; tests and error paths use this)."""
    if ssl:
        lib.SSL_free(_ptr(ssl))


def alpn_selected(ssl: int) -> str | None:
    """The ALPN protocol agreed on ``ssl``, or None."""
    data = ffi.new("const unsigned char **")
    size = ffi.new("unsigned int *")
    lib.SSL_get0_alpn_selected(_ptr(ssl), data, size)
    if size[0] == 0:
        return None
    return bytes(ffi.buffer(data[0], size[0])).decode("ascii", "replace")


def session_reused(ssl: int) -> bool:
    return bool(lib.SSL_session_reused(_ptr(ssl)))


def tls_version(ssl: int) -> str:
    return str(ffi.string(lib.SSL_get_version(_ptr(ssl))).decode())


# --------------------------------------------------------------------------- server side

# the live ServerTLS of each default context, by the context's address
_servers: weakref.WeakValueDictionary[int, ServerTLS] = weakref.WeakValueDictionary()


def _ascii(name: str) -> bytes:
    """A host name as OpenSSL takes it: IDNA A-labels for a non-ASCII name."""
    try:
        return name.encode("ascii")
    except UnicodeEncodeError:
        return name.encode("idna")


def _addr(cdata: Any) -> int:
    return int(ffi.cast("uintptr_t", cdata))


def _on_miss_error(exc_type: Any, exc: Any, tb: Any) -> None:  # pragma: no cover
    log.warning("TLS: the SNI handler failed (%s: %s)", getattr(exc_type, "__name__", "?"), exc)


@ffi.def_extern(onerror=_on_miss_error)  # type: ignore[untyped-decorator]
def elb_sni_miss(ssl: Any, name: Any) -> Any:
    """Called from the servername callback (C) when no fresh leaf serves ``name``.

    Returns the leaf context (owned by the C table) or NULL; never raises into C.
    """
    try:
        server = _servers.get(_addr(lib.SSL_get_SSL_CTX(ssl)))
        text = ffi.string(name).decode("ascii", "replace")
        if server is None:
            lib.elb_ssl_set_note(ssl, b"no TLS server for this connection (closed)")
            return ffi.NULL
        return server._on_miss(ssl, text)
    except Exception as e:  # anything: C cannot take an exception
        log.warning("TLS: no certificate for an SNI name: %s", e)
        return ffi.NULL


def _nothing() -> None:
    pass


def _refused(reason: str) -> None:
    pass


def _peer_of(ssl: Any) -> str | None:
    """The client address of a server SSL's socket (its write side: the read side may be
    a memory BIO holding an early ClientHello), or None if it has none."""
    fd = lib.SSL_get_wfd(ssl)
    if fd < 0:
        return None
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        peer = sock.getpeername()
    except OSError:
        return None
    finally:
        sock.detach()
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return None  # a Unix socket: no address to tell clients apart


class MintLimiter:
    """Token buckets for new leaves: ``burst`` at once and ``per_minute`` after that for each
    client address, and :data:`GLOBAL_MINT_FACTOR` times as many for all clients together
    (the only bucket for a client whose address is unknown). ``per_minute`` 0: no limit.

    The per-client buckets are bounded (the table is cleared when it fills);
    ``clock`` is monotonic seconds (the server passes ``time.monotonic``).
    """

    def __init__(
        self,
        clock: Callable[[], float],
        per_minute: int = DEFAULT_MINT_RATE,
        burst: int = DEFAULT_MINT_BURST,
    ) -> None:
        if per_minute < 0 or burst < 1:
            raise ValueError("per_minute must be at least 0 and burst at least 1")
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.clock = clock
        self.refused = 0
        self._clients: dict[str, list[float]] = {}
        now = clock()
        self._all = [self.burst * GLOBAL_MINT_FACTOR, now]

    @staticmethod
    def _refill(bucket: list[float], rate: float, cap: float, now: float) -> None:
        bucket[0] = min(cap, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now

    def take(self, client: str | None) -> bool:
        """Whether ``client`` (an address, or None) may have one more leaf minted now."""
        if self.rate == 0:
            return True
        now = self.clock()
        factor = GLOBAL_MINT_FACTOR
        self._refill(self._all, self.rate * factor, self.burst * factor, now)
        mine: list[float] | None = None
        if client is not None:
            mine = self._clients.get(client)
            if mine is None:
                if len(self._clients) >= _MINT_CLIENTS:
                    self._clients.clear()
                mine = self._clients[client] = [self.burst, now]
            else:
                self._refill(mine, self.rate, self.burst, now)
        if self._all[0] < 1 or (mine is not None and mine[0] < 1):
            self.refused += 1
            return False
        self._all[0] -= 1
        if mine is not None:
            mine[0] -= 1
        return True


class ServerTLS:
    """The server (client-facing) side of interception: one default context, leaves by SNI.

    ``clock`` is what the leaves are minted against; ``table_size`` bounds the C
    table of leaf contexts (the oldest inserted entry goes when it is full).
    ``intercept``: the host globs whose names get a leaf (by default the
    authority's); ``limiter``: who may have new leaves minted, and how fast
    (None: no limit).
    One per worker, used from the loop's thread.
    """

    def __init__(
        self,
        authority: CertificateAuthority,
        clock: Callable[[], dt.datetime],
        table_size: int = DEFAULT_TABLE_SIZE,
        intercept: Sequence[str] | None = None,
        limiter: MintLimiter | None = None,
    ) -> None:
        if table_size < 1:
            raise ValueError("table_size must be at least 1")
        self.authority = authority
        self.intercept = tuple(
            g.lower() for g in (authority.intercept if intercept is None else intercept)
        )
        self.limiter = limiter
        #: SNI names refused a leaf: not covered by a glob, or over the mint rate
        self.refused = 0
        self.clock = clock
        self.table_size = table_size
        ctx = lib.elb_server_ctx_new(table_size)
        if ctx == ffi.NULL:
            raise _config_error("cannot create the TLS server context")
        self._ctx: Any = ctx
        self._finalizer = weakref.finalize(self, lib.SSL_CTX_free, ctx)
        _servers[_addr(ctx)] = self
        self.last_failure: TLSError | None = None
        #: called once for each leaf minted (not loaded): /metrics counts them
        self.on_mint: Callable[[], None] = _nothing
        #: called with "not_intercepted" or "rate" for each name refused a leaf
        self.on_refuse: Callable[[str], None] = _refused

    # the servername callback's slow path
    def _on_miss(self, ssl: Any, name: str) -> Any:
        if not covered(name, self.intercept):
            # before any key is made: a client choosing names must not cost a mint
            self.refused += 1
            self.on_refuse("not_intercepted")
            reason = f"no certificate for {name[:255]!r}: not an intercepted host"
            log.debug("TLS: %s", reason)
            self.last_failure = TLSConfigError(reason)
            lib.elb_ssl_set_note(ssl, reason.encode("utf-8", "replace")[: _TEXT_CAP - 1])
            return ffi.NULL

        limited = False

        def may_mint() -> bool:
            nonlocal limited
            if self.limiter is None or self.limiter.take(_peer_of(ssl)):
                return True
            limited = True
            self.refused += 1
            self.on_refuse("rate")
            return False

        try:
            minted = self.authority.minted
            leaf = self.authority.leaf_for(name, self.clock(), may_mint)
            if self.authority.minted != minted:
                self.on_mint()
            ctx = self._leaf_ctx(leaf)
        except Exception as e:
            reason = f"no certificate for {name!r}: {e}"
            # a client over the mint rate is told in the handshake, not in the log each time
            log.log(logging.DEBUG if limited else logging.WARNING, "TLS: %s", reason)
            self.last_failure = TLSConfigError(reason)
            lib.elb_ssl_set_note(ssl, reason.encode("utf-8", "replace")[: _TEXT_CAP - 1])
            return ffi.NULL
        try:
            renew_at = int(leaf.renew_at().timestamp())
            if not lib.elb_sni_insert(self._ctx, leaf.name.encode("ascii"), ctx, renew_at):
                reason = f"cannot add the leaf for {leaf.name!r} to the SNI table"
                self.last_failure = _config_error(reason)
                lib.elb_ssl_set_note(ssl, reason.encode())
                return ffi.NULL
        finally:
            lib.SSL_CTX_free(ctx)  # the table holds its own reference
        return ctx

    def _leaf_ctx(self, leaf: Leaf) -> Any:
        chain, key = leaf.cert_chain_pem, leaf.key_pem
        ctx = lib.elb_leaf_ctx_new(chain, len(chain), key, len(key))
        if ctx == ffi.NULL:
            raise _config_error(f"the leaf certificate for {leaf.name} does not load")
        return ctx

    def add_leaf(self, leaf: Leaf) -> None:
        """Load ``leaf`` into the table ahead of time (e.g. the intercepted names at start)."""
        ctx = self._leaf_ctx(leaf)
        try:
            renew_at = int(leaf.renew_at().timestamp())
            if not lib.elb_sni_insert(self._ctx, leaf.name.encode("ascii"), ctx, renew_at):
                raise _config_error(f"cannot add the leaf for {leaf.name!r} to the SNI table")
        finally:
            lib.SSL_CTX_free(ctx)

    def new_ssl(self, fd: int, fallback_name: str, early: bytes = b"") -> int:
        """A server ``SSL*`` (as an int) on socket ``fd``, in accept state.

        ``fallback_name`` (the CONNECT host) picks the leaf when the client sends
        no SNI. ``early``: bytes of the ClientHello already read from ``fd``; they
        are read first from a memory BIO (empty means "retry", not EOF), and the
        loop swaps in a socket rbio once it is drained. ``fd`` is never closed by
        OpenSSL. Raises :class:`TLSError` on failure.
        """
        if not self._finalizer.alive:
            raise TLSConfigError("the TLS server context is closed")
        name = fallback_name.lower().rstrip(".")
        if name.startswith("[") and name.endswith("]"):
            name = name[1:-1]  # an IPv6 literal: the leaf's SAN is the bare address
        ssl = lib.elb_server_ssl(self._ctx, fd, _ascii(name), early, len(early))
        if ssl == 0:
            raise _config_error("cannot create a server TLS connection")
        return int(ssl)

    def new_ssl_over(self, outer: int, fallback_name: str) -> int:
        """A server ``SSL*`` (as an int) that reads and writes through the TLS
        session ``outer`` (an ``SSL*`` as an int): a CONNECT intercepted inside a
        ``--listen-tls`` connection. Raises :class:`TLSError` on failure."""
        if not self._finalizer.alive:
            raise TLSConfigError("the TLS server context is closed")
        name = fallback_name.lower().rstrip(".").strip("[]")
        ssl = lib.elb_server_ssl_over(self._ctx, ffi.cast("SSL *", outer), _ascii(name))
        if ssl == 0:
            raise _config_error("cannot create a server TLS connection inside TLS")
        return int(ssl)

    def failure(self, ssl: int) -> TLSError:
        """Why a client's handshake on ``ssl`` failed (see :func:`error_for`).

        A connection closed (or reset) without an alert after a leaf was picked for
        it, so after elbasy's certificate went out, says so: a client that
        rejects the certificate often leaves that way (:mod:`elbasy.trust`).
        """
        error = error_for(ssl)
        if (
            type(error) is HandshakeError
            and error.code == 0
            and self._finalizer.alive
            and lib.SSL_get_SSL_CTX(_ptr(ssl)) != self._ctx
        ):
            return HandshakeError(
                f"TLS handshake failed: {CLOSED_AFTER_LEAF}", reason=CLOSED_AFTER_LEAF
            )
        return error

    def set_time(self, now: dt.datetime | None) -> None:
        """Judge leaves' freshness in C at ``now`` (None: the wall clock, the default)."""
        lib.elb_sni_set_now(self._ctx, 0 if now is None else max(1, int(now.timestamp())))

    def stats(self) -> dict[str, int]:
        """Counters: ``sni_hits`` (served in C), ``sni_misses`` (Python called),
        ``contexts`` (in the table) and ``capacity`` (its bound)."""
        out = ffi.new("uint64_t[4]")
        if not self._finalizer.alive or not lib.elb_sni_stats(self._ctx, out):
            return {"sni_hits": 0, "sni_misses": 0, "contexts": 0, "capacity": self.table_size}
        return {
            "sni_hits": int(out[0]),
            "sni_misses": int(out[1]),
            "contexts": int(out[2]),
            "capacity": int(out[3]),
        }

    def clear(self) -> None:
        """Drop every leaf context (the next handshake for each name mints or loads again)."""
        if self._finalizer.alive:
            lib.elb_sni_clear(self._ctx)

    def close(self) -> None:
        """Free the contexts; SSLs still alive keep what they use until SSL_free."""
        _servers.pop(_addr(self._ctx), None)
        self._finalizer()

    def __enter__(self) -> ServerTLS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- client side


class ListenerTLS:
    """The certificate of ``--listen-tls``: the one a client checks when it reaches
    elbasy's proxy over TLS (``HTTPS_PROXY=https://...``). One per worker."""

    def __init__(self, cert_pem: bytes, key_pem: bytes) -> None:
        ctx = lib.elb_leaf_ctx_new(cert_pem, len(cert_pem), key_pem, len(key_pem))
        if ctx == ffi.NULL:
            raise _config_error("the --listen-tls certificate and key do not load together")
        self._ctx: Any = ctx
        self._finalizer = weakref.finalize(self, lib.SSL_CTX_free, ctx)

    def new_ssl(self, fd: int) -> int:
        """A server ``SSL*`` (as an int) accepting on socket ``fd``."""
        if not self._finalizer.alive:
            raise TLSConfigError("the --listen-tls context is closed")
        ssl = lib.elb_server_ssl(self._ctx, fd, ffi.NULL, ffi.NULL, 0)
        if ssl == 0:
            raise _config_error("cannot create a server TLS connection")
        return int(ssl)

    def close(self) -> None:
        self._finalizer()


class ClientTLS:
    """The upstream side: verified TLS 1.2+ with SNI, ALPN http/1.1 and session resumption.

    Trust: OpenSSL's default paths, what :func:`elbasy.trust.upstream_trust`
    finds on this host (``SSL_CERT_FILE``/``SSL_CERT_DIR``, else the distro's
    bundle, else certifi's; :attr:`trust`), and ``extra_ca`` (a PEM bundle,
    ``--upstream-ca``).
    :class:`TLSConfigError` names the file if it does not load.
    """

    def __init__(
        self, extra_ca: str | None = None, cache_size: int = DEFAULT_SESSION_CACHE
    ) -> None:
        ctx = lib.elb_client_ctx_new(max(1, cache_size))
        if ctx == ffi.NULL:
            raise _config_error("cannot create the upstream TLS context")
        self._ctx: Any = ctx
        self._finalizer = weakref.finalize(self, lib.SSL_CTX_free, ctx)
        self.trust: Trust = upstream_trust()
        lib.elb_client_ctx_load_defaults(
            ctx,
            os.fsencode(self.trust.cafile) if self.trust.cafile else ffi.NULL,
            os.fsencode(self.trust.capath) if self.trust.capath else ffi.NULL,
        )
        self.extra_ca = extra_ca
        if extra_ca is not None:
            if not os.path.isfile(extra_ca):
                self.close()
                raise TLSConfigError(
                    f"the upstream CA file {extra_ca} does not exist or is not a file"
                )
            lib.ERR_clear_error()
            if lib.SSL_CTX_load_verify_locations(ctx, os.fsencode(extra_ca), ffi.NULL) != 1:
                error = _config_error(f"the upstream CA file {extra_ca} does not load")
                self.close()
                raise error

    def new_ssl(self, fd: int, host: str) -> int:
        """A client ``SSL*`` (as an int) on socket ``fd`` for ``host``, in connect state.

        A DNS name gets SNI and a host name check; an IP literal (brackets allowed)
        an IP check and no SNI. A cached session for ``host`` is offered.
        """
        if not self._finalizer.alive:
            raise TLSConfigError("the upstream TLS context is closed")
        ssl = lib.elb_client_ssl(self._ctx, fd, _ascii(host.lower().rstrip(".")))
        if ssl == 0:
            raise _config_error(f"cannot create an upstream TLS connection for {host!r}")
        return int(ssl)

    def failure(self, ssl: int) -> TLSError:
        """The exception for a failed upstream handshake on ``ssl`` (see :func:`error_for`)."""
        return error_for(ssl)

    def sessions(self) -> int:
        """How many hosts have a session cached for resumption."""
        return int(lib.elb_client_sessions(self._ctx)) if self._finalizer.alive else 0

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> ClientTLS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
