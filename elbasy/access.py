"""Who may use elbasy: proxy credentials and the client networks allowed in.

An egress proxy is a door out of a private network, so elbasy can ask two
things of a client before it does anything for it:

* **credentials** (``--auth-file PATH``, ``--auth-env NAME``): every request
  and CONNECT carries ``Proxy-Authorization: Basic <base64 user:password>``
  or ``Bearer <token>``; elbasy's own pages (``/``, ``/healthz``,
  ``/metrics``...) take the same credentials in ``Authorization`` (what a
  browser, curl ``-u`` and Prometheus' ``basic_auth`` send). A credential is
  a ``user:password`` pair or a bare token (no colon); a token is also
  accepted in Basic, as the password (any user name) or as the user name
  with an empty password, since most clients can only put credentials in
  the proxy URL (``http://TOKEN@host:port``).
* **client networks** (``--allow-clients CIDR,...``): a client whose address
  is outside every one is refused at accept: the loop asks
  :meth:`ClientNetworks.allows_key` (through ``Policy.client_allowed``) once
  per address and closes that address's connections before reading a byte.

Credentials are read when elbasy starts and on every reload (SIGHUP), never
per request; the checker keeps only their SHA-256 digests and compares a
presented credential with every one of its kind by
:func:`hmac.compare_digest`, without stopping at a match, so the time taken
tells nothing of which credential (or how much of one) was right.

Plain Python over bytes: the policy calls :meth:`Credentials.check` and
:meth:`ClientNetworks.allows_key`; :func:`load_access` is the only I/O here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from elbasy.config import Config

__all__ = [
    "Access",
    "AccessError",
    "ClientNetworks",
    "Credentials",
    "REALM",
    "address_of_key",
    "load_access",
    "parse_credentials",
    "warn_if_open",
]

log = logging.getLogger("elbasy.auth")

#: the realm of elbasy's challenges (``Proxy-Authenticate``, ``WWW-Authenticate``)
REALM = "elbasy"
#: refused client addresses a worker remembers having logged (all forgotten when full)
CLIENTS_KEPT = 4096


class AccessError(ValueError):
    """The credentials cannot be loaded (a missing file, no credentials in it...)."""


def _digest(secret: bytes) -> bytes:
    # fixed-length digests: compare_digest then takes the same time whatever
    # the lengths of the credential presented and the one it is compared with
    return hashlib.sha256(secret).digest()


def _matches(known: Sequence[bytes], presented: bytes) -> bool:
    """Whether ``presented`` is one of ``known`` (digests): compared with every one."""
    digest = _digest(presented)
    found = False
    for each in known:
        found |= hmac.compare_digest(digest, each)
    return found


class Credentials:
    """The credentials a client may present: ``user:password`` pairs and bare tokens."""

    __slots__ = ("_pairs", "_tokens", "count")

    def __init__(self, entries: Iterable[str]) -> None:
        pairs: list[bytes] = []
        tokens: list[bytes] = []
        for entry in entries:
            raw = entry.encode("utf-8")
            (pairs if b":" in raw else tokens).append(_digest(raw))
        self._pairs = tuple(pairs)
        self._tokens = tuple(tokens)
        self.count = len(pairs) + len(tokens)

    def check(self, value: bytes | None) -> bool:
        """Whether an ``Authorization`` or ``Proxy-Authorization`` value is valid.

        ``Basic <base64 user:password>``: the pair, or a token as the password
        (any user name) or as the user name with no password; ``Bearer
        <token>``: the token. The scheme is case-insensitive (RFC 9110 11.1).
        """
        if not value:
            return False
        scheme, _, rest = value.strip().partition(b" ")
        scheme = scheme.lower()
        rest = rest.strip()
        if scheme == b"bearer":
            return bool(rest) and _matches(self._tokens, rest)
        if scheme != b"basic":
            return False
        try:
            decoded = base64.b64decode(rest, validate=True)
        except (binascii.Error, ValueError):
            return False
        user, colon, password = decoded.partition(b":")
        if not colon:
            return bool(user) and _matches(self._tokens, user)
        # every candidate compared (| is no short cut): the time says nothing of
        # which of them matched
        ok = _matches(self._pairs, decoded)
        ok |= bool(password) and _matches(self._tokens, password)
        ok |= not password and bool(user) and _matches(self._tokens, user)
        return ok


def parse_credentials(text: str, where: str) -> list[str]:
    """The credentials of an ``--auth-file``: one a line, ``#`` lines are comments.

    A line is stripped of the whitespace around it; blank lines are skipped.
    Raises :class:`AccessError` naming ``where`` and the line for a control
    character or a pair without a user name.
    """
    out: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        _check_entry(entry, f"{where}, line {number}")
        out.append(entry)
    return out


def _check_entry(entry: str, where: str) -> None:
    if any(ord(c) < 32 or ord(c) == 127 for c in entry):
        raise AccessError(f"{where}: a credential holds a control character")
    if entry.startswith(":"):
        raise AccessError(f"{where}: a user:password credential has no user name")


class ClientNetworks:
    """The networks clients may connect from (``--allow-clients``)."""

    __slots__ = ("networks",)

    def __init__(self, networks: Sequence[str]) -> None:
        self.networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)

    def allows_key(self, key: bytes) -> bool:
        """Whether the client address the loop keys as ``key`` (its family, 4 or
        6, then the packed address: ``elb_peer_key``) is inside one of the
        networks. Anything else is refused."""
        address = address_of_key(key)
        return address is not None and self._inside(address)

    def allows(self, client: str) -> bool:
        """Whether ``client`` (``ip:port`` or ``[ipv6]:port``, as the loop names
        it) is inside one of the networks. Anything that is no address is refused."""
        host = client.rpartition(":")[0]
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return self._inside(address)

    def _inside(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        # an IPv4-mapped IPv6 address (::ffff:10.0.0.1, a dual-stack
        # listener's IPv4 client) counts as its IPv4 address
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


def address_of_key(key: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address the loop's client key names (``4`` + 4 bytes, ``6`` + 16), or None."""
    if len(key) == 5 and key[0] == 4 or len(key) == 17 and key[0] == 6:
        return ipaddress.ip_address(key[1:])
    return None


@dataclass(frozen=True)
class Access:
    """What a worker asks of its clients: None for either, nothing."""

    credentials: Credentials | None = None
    clients: ClientNetworks | None = None

    @property
    def guarded(self) -> bool:
        """Whether anything is asked at all."""
        return self.credentials is not None or self.clients is not None


#: nothing asked: every client may use the proxy (elbasy's default, on loopback)
OPEN = Access()


def load_access(config: Config, environ: dict[str, str] | None = None) -> Access:
    """The access rules of ``config``: its credentials read from ``--auth-file`` and
    the variable ``--auth-env`` names (in ``environ``, by default the process's).

    Raises :class:`AccessError` (one line) when the file cannot be read, the
    variable is unset, or neither holds a credential.
    """
    env = os.environ if environ is None else environ
    entries: list[str] = []
    sources: list[str] = []
    if config.auth_file is not None:
        path = config.auth_file
        try:
            with open(path, encoding="utf-8") as f:
                mode = os.fstat(f.fileno()).st_mode
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise AccessError(f"cannot read --auth-file {path!r}: {reason}") from None
        if mode & stat.S_IROTH:
            log.warning("--auth-file %s is readable by every user: chmod o-r it", path)
        entries += parse_credentials(text, f"--auth-file {path!r}")
        sources.append(f"--auth-file {path!r}")
    if config.auth_env is not None:
        name = config.auth_env
        value = env.get(name)
        if value is None:
            raise AccessError(f"--auth-env {name}: the environment variable {name} is not set")
        # separated by whitespace (so one line of an env file holds several)
        for entry in value.split():
            _check_entry(entry, f"--auth-env {name}")
            entries.append(entry)
        sources.append(f"the environment variable {name}")
    credentials = None
    if sources:
        if not entries:
            raise AccessError(f"no credentials in {' or '.join(sources)}")
        credentials = Credentials(entries)
    clients = ClientNetworks(config.allow_clients) if config.allow_clients else None
    return Access(credentials, clients)


def is_loopback(host: str) -> bool:
    """Whether a listening address (as getsockname gives it) is loopback only."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host == "localhost"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def warn_if_open(host: str, where: str, access: Access) -> bool:
    """Log a WARNING when elbasy listens beyond loopback and asks nothing of its
    clients: anyone who reaches the address may use it. True: it warned."""
    if access.guarded or is_loopback(host):
        return False
    log.warning(
        "listening on %s, beyond loopback, with no proxy authentication "
        "(--auth-file, --auth-env) and no --allow-clients: anyone who can reach "
        "this address can use elbasy as a proxy and read its pages",
        where,
    )
    return True


def warn_if_transparent_open(host: str, where: str, access: Access) -> bool:
    """Log a WARNING when a --transparent listener listens beyond loopback without
    --allow-clients: its clients do not know a proxy is there, so they send no
    credentials, and --auth-* cannot guard it. True: it warned."""
    if access.clients is not None or is_loopback(host):
        return False
    log.warning(
        "transparent listener on %s, beyond loopback, with no --allow-clients: its "
        "clients send no proxy credentials, so anyone who can reach this address can "
        "use it",
        where,
    )
    return True
