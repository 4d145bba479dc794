"""elbasy's local certificate authority: the CA that interception's leaves chain to.

Plain Python over ``cryptography``; no sockets, no event loop. Wherever time
matters the caller passes ``now`` (an aware :class:`datetime`), so tests and
the loop decide what the clock says.

Files
=====

Everything lives in one data dir (``--data-dir``; default
``$XDG_DATA_HOME/elbasy``, else ``~/.local/share/elbasy``), mode 0700::

    ca.pem            the CA certificate (what clients trust)
    ca-key.pem        its ECDSA P-256 private key, mode 0600, never group/world readable
    ca.json           the intercept globs the CA was made for
    leaves/<name>.pem a leaf certificate followed by its key, mode 0600
                      (<name> is the SAN: ``*.myshopify.com.pem``, ``api.etsy.com.pem``,
                      ``127.0.0.1.pem``)

Every file is written atomically (a temporary file in the same directory,
fsync, rename), so a crash leaves the old file or the new one, never half.
A CA key readable by anyone but its owner is refused, with the ``chmod`` that
fixes it.

The CA
======

Subject ``CN=elbasy local CA on <hostname>, O=elbasy, OU=created <time>``
(the OU makes each CA's name unique, so a re-created CA never shares a
subject with the one it replaces in a trust store). Extensions:
BasicConstraints CA:TRUE pathlen 0 (critical), KeyUsage keyCertSign and
cRLSign (critical), ExtendedKeyUsage serverAuth, SubjectKeyIdentifier and,
unless ``unconstrained``, NameConstraints (critical).

Validity: 10 years, back-dated one hour for clock skew. :meth:`needs_new_ca`
(and ``elbasy ca show``) start saying "rotate" when less than a year is left:
run ``elbasy ca init --force`` and re-trust the new certificate. Rotate sooner
if the key may have been read by anyone else, or when the intercepted hosts
outgrow the name constraints (``needs_new_ca`` says so).

Name constraints
================

RFC 5280 §4.2.1.10: a dNSName constraint ``example.com`` is satisfied by any
name made by adding zero or more labels on the left, so it permits
``example.com`` itself and every name under it (``a.example.com``,
``a.b.example.com``), and nothing else (not ``badexample.com``). A leading dot
(``.example.com``) is not defined for dNSName by RFC 5280; OpenSSL and Go read
it as "subdomains only" but other verifiers may not, so elbasy never emits it.
Each intercept glob (a case-insensitive shell glob, as ``--connect-to``'s
host) maps to one subtree:

* ``api.etsy.com`` → ``api.etsy.com`` (names under it are permitted too);
* ``*.myshopify.com`` → ``myshopify.com`` (the bare ``myshopify.com`` too);
* ``api*.example.com``, ``shop.*.example.com`` → ``example.com``: not
  expressible, so the nearest parent that is;
* ``127.0.0.1``, ``::1`` → iPAddress ``127.0.0.1/32``, ``::1/128``.

So the rule is: drop every label up to and including the last one holding a
glob character (``*``, ``?``, ``[``); what is left is the subtree. Left with
nothing (``*``, ``example.*``), or with a single label from a glob (``*.com``),
or with something that is not a host name, the glob cannot be constrained and
:func:`subtree_for_glob` raises :class:`CAError`, which says to use
``--unconstrained-ca`` if that is really meant. Subtrees already covered by
another one are dropped (``api.etsy.com`` under ``etsy.com``).

IP addresses: with no IP literal among the globs the CA also *excludes*
``0.0.0.0/0`` and ``::/0``, so its key cannot certify any IP address; with IP
literals, exactly those addresses are permitted.

``unconstrained=True`` leaves the extension out (and logs a warning): the key
can then impersonate any host to whoever trusts it.

Leaves
======

:meth:`CertificateAuthority.leaf_for` mints one leaf per *SAN name*:

* a name one label below an intercept glob ``*.<fixed part>`` (no other glob
  characters) gets the wildcard: under ``*.myshopify.com``, ``shop1`` and
  ``shop2.myshopify.com`` share one leaf for ``*.myshopify.com``. A TLS
  wildcard covers exactly one label, so ``a.b.myshopify.com`` gets its own
  leaf, as does the bare ``myshopify.com``; so does every name under a glob
  like ``api*.etsy.com`` (a ``*.etsy.com`` leaf would serve more than asked).
* any other name gets a leaf for itself; an IP literal gets an iPAddress SAN.

A name the CA's constraints do not permit raises :class:`CAError` (a client
would reject that leaf anyway).

Each leaf has its own ECDSA P-256 key. Key generation costs about as much as
the signature, so there is nothing to save by sharing one, and a per-leaf key
keeps each ``leaves/<name>.pem`` self-contained (cert and key can never
disagree across files), gives every renewal a fresh key, and bounds what one
leaked leaf file impersonates to its own name for its own 30 days.

Validity: 30 days (never past the CA's own expiry), back-dated one hour.
A leaf is renewed when less than a third of its lifetime is left (10 days),
so clients never see one near expiry. Leaves are cached in memory (an LRU of
``cache_size`` entries) and on disk; a name is minted again only when its leaf
is missing, damaged, issued by another CA, or due for renewal.

Not thread-safe: one :class:`CertificateAuthority` per worker, used from the
loop's thread.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import logging
import os
import re
import stat
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from elbasy.errors import ElbasyError

__all__ = [
    "CA_LIFETIME",
    "CA_ROTATE_BEFORE",
    "LEAF_LIFETIME",
    "CAError",
    "CertificateAuthority",
    "Constraints",
    "Leaf",
    "constraints_for",
    "default_data_dir",
    "subtree_for_glob",
]

log = logging.getLogger("elbasy.ca")

CA_LIFETIME: Final = dt.timedelta(days=3650)
CA_ROTATE_BEFORE: Final = dt.timedelta(days=365)
LEAF_LIFETIME: Final = dt.timedelta(days=30)
BACKDATE: Final = dt.timedelta(hours=1)
DEFAULT_CACHE_SIZE: Final = 1024

CA_CERT_FILE: Final = "ca.pem"
CA_KEY_FILE: Final = "ca-key.pem"
CA_META_FILE: Final = "ca.json"
LEAVES_DIR: Final = "leaves"

_GLOB_CHARS = frozenset("*?[]")
_LABEL_RE = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


class CAError(ElbasyError):
    """The CA cannot be created, loaded or used; the message says why and what to do."""


# --------------------------------------------------------------------------- paths


def default_data_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_DATA_HOME/elbasy`` if set to an absolute path, else ``~/.local/share/elbasy``."""
    env = os.environ if env is None else env
    xdg = env.get("XDG_DATA_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "elbasy"
    home = env.get("HOME") or os.path.expanduser("~")
    return Path(home) / ".local" / "share" / "elbasy"


# --------------------------------------------------------------------------- names


def _is_host_name(name: str) -> bool:
    if not name or len(name) > 253:
        return False
    return all(_LABEL_RE.match(label) for label in name.split("."))


def _parse_ip(text: str) -> IPAddr | None:
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _normalize_name(server_name: str) -> str | IPAddr:
    """A lower-case A-label host name or an IP address; CAError for anything else."""
    ip = _parse_ip(server_name)
    if ip is not None:
        return ip
    name = server_name.rstrip(".").lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise CAError(f"{server_name!r} is not a valid host name") from None
    if not _is_host_name(name):
        raise CAError(f"{server_name!r} is not a valid host name")
    return name


def _is_glob(label: str) -> bool:
    return any(c in _GLOB_CHARS for c in label)


def subtree_for_glob(glob: str) -> str | IPNetwork:
    """The name-constraint subtree that covers every host ``glob`` matches.

    A DNS name (``*.myshopify.com`` → ``myshopify.com``) or, for an IP literal,
    a one-address network. See the module docstring for the mapping; raises
    :class:`CAError` when the glob has no expressible subtree.
    """
    text = glob.strip().rstrip(".").lower()
    ip = _parse_ip(text)
    if ip is not None:
        return ipaddress.ip_network(ip)
    labels = text.split(".")
    wild = [i for i, label in enumerate(labels) if _is_glob(label)]
    fixed = labels[wild[-1] + 1 :] if wild else labels
    subtree = ".".join(fixed)
    unconstrainable = (
        f"intercept glob {glob!r} cannot be expressed as a name constraint "
        "(it would permit {what}); list narrower globs, or create the CA with "
        "--unconstrained-ca if every host is really meant"
    )
    if not subtree:
        raise CAError(unconstrainable.format(what="every host name"))
    if not subtree.isascii() or not _is_host_name(subtree):
        raise CAError(f"intercept glob {glob!r} is not a host name, IP address or glob")
    if all(label.isdigit() for label in fixed):
        raise CAError(f"intercept glob {glob!r}: IP address globs cannot be constrained")
    if wild and len(fixed) == 1:
        raise CAError(unconstrainable.format(what=f"every name under .{subtree}"))
    if wild and not (len(wild) == 1 and wild[0] == 0 and labels[0] == "*"):
        log.info(
            "intercept glob %r is not a subtree; the CA permits its nearest parent %r",
            glob,
            subtree,
        )
    return subtree


def _dns_within(name: str, subtree: str) -> bool:
    """RFC 5280 dNSName matching: ``name`` is ``subtree`` plus zero or more labels on the left."""
    return name == subtree or name.endswith("." + subtree)


@dataclass(frozen=True, slots=True)
class Constraints:
    """The permitted (and excluded) subtrees of a name-constrained CA."""

    dns: tuple[str, ...]
    ips: tuple[IPNetwork, ...] = ()
    excluded_ips: tuple[IPNetwork, ...] = ()

    def permits(self, name: str | IPAddr) -> bool:
        """Whether a certificate for ``name`` (normalized) is within these constraints."""
        if isinstance(name, str):
            return any(_dns_within(name.removeprefix("*."), d) for d in self.dns)
        if any(name in net for net in self.excluded_ips):
            return False
        return not self.ips or any(name in net for net in self.ips)

    def covers(self, subtree: str | IPNetwork) -> bool:
        """Whether every name in ``subtree`` is permitted."""
        if isinstance(subtree, str):
            return any(_dns_within(subtree, d) for d in self.dns)
        if any(subtree.overlaps(net) for net in self.excluded_ips):
            return False
        return any(
            subtree.version == net.version and subtree.subnet_of(net)  # type: ignore[arg-type]
            for net in self.ips
        )

    def extension(self) -> x509.NameConstraints:
        permitted: list[x509.GeneralName] = [x509.DNSName(d) for d in self.dns]
        permitted += [x509.IPAddress(net) for net in self.ips]
        excluded: list[x509.GeneralName] = [x509.IPAddress(net) for net in self.excluded_ips]
        return x509.NameConstraints(permitted or None, excluded or None)

    @classmethod
    def from_extension(cls, ext: x509.NameConstraints) -> Constraints:
        dns: list[str] = []
        ips: list[IPNetwork] = []
        excluded: list[IPNetwork] = []
        for general in ext.permitted_subtrees or ():
            if isinstance(general, x509.DNSName):
                dns.append(general.value.lower())
            elif isinstance(general, x509.IPAddress) and not isinstance(
                general.value, ipaddress.IPv4Address | ipaddress.IPv6Address
            ):
                ips.append(general.value)
        for general in ext.excluded_subtrees or ():
            if isinstance(general, x509.IPAddress) and not isinstance(
                general.value, ipaddress.IPv4Address | ipaddress.IPv6Address
            ):
                excluded.append(general.value)
        return cls(tuple(dns), tuple(ips), tuple(excluded))

    def summary(self) -> str:
        """One line: the permitted subtrees, then any excluded ones."""
        text = ", ".join([*self.dns, *(str(n) for n in self.ips)])
        if self.excluded_ips:
            text += "; excluded " + ", ".join(str(n) for n in self.excluded_ips)
        return text

    def describe(self) -> list[str]:
        lines = [f"permitted DNS: {d} (and every name under it)" for d in self.dns]
        lines += [f"permitted IP: {net}" for net in self.ips]
        if self.excluded_ips:
            lines.append("excluded IP: " + ", ".join(str(n) for n in self.excluded_ips))
        return lines


def constraints_for(globs: Iterable[str]) -> Constraints:
    """The name constraints a CA for these intercept globs carries (see the module docstring)."""
    dns: list[str] = []
    ips: list[IPNetwork] = []
    for glob in globs:
        subtree = subtree_for_glob(glob)
        if isinstance(subtree, str):
            dns.append(subtree)
        elif subtree not in ips:
            ips.append(subtree)
    # drop subtrees inside another one; keep the order they were given in
    kept: list[str] = []
    for d in dns:
        if d in kept or any(_dns_within(d, o) for o in dns if o != d):
            continue
        kept.append(d)
    if not kept and not ips:
        raise CAError(
            "a name-constrained CA needs at least one --intercept GLOB "
            "(or --unconstrained-ca to permit every host)"
        )
    excluded: tuple[IPNetwork, ...] = ()
    if not ips:
        excluded = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
    return Constraints(tuple(kept), tuple(ips), excluded)


def _san_name(name: str | IPAddr, globs: Sequence[str]) -> str | IPAddr:
    """The SAN a leaf for ``name`` carries: a wildcard when an intercept glob allows it."""
    if not isinstance(name, str):
        return name
    parent = name.partition(".")[2]
    if parent.count(".") < 1:  # never *.com
        return name
    for glob in globs:
        first, _, rest = glob.lower().rstrip(".").partition(".")
        if first == "*" and rest == parent:
            return "*." + parent
    return name


# --------------------------------------------------------------------------- files


def _write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` with ``mode`` so that readers see the old file or the new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _make_private_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            os.chmod(path, 0o700)
    except OSError as e:
        raise CAError(f"cannot create the data dir {path}: {e.strerror}") from None


def _check_private(path: Path, what: str) -> None:
    """Refuse a key file or dir others can read or write."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        fix = "700" if path.is_dir() else "600"
        raise CAError(
            f"{what} {path} has mode {mode:04o}: other users can read or change it, so it is "
            f"not loaded. If nobody else has used it, fix it with: chmod {fix} {path} "
            f"(otherwise make a new CA: elbasy ca init --force)"
        )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise CAError(f"cannot read {what} {path}: {e.strerror}") from None


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _same_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    return cert.public_key() == key.public_key()


def _utc(now: dt.datetime) -> dt.datetime:
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime (e.g. datetime.now(UTC))")
    return now.astimezone(dt.UTC)


# --------------------------------------------------------------------------- leaves


@dataclass(frozen=True, slots=True, eq=False)
class Leaf:
    """A server certificate for one SAN name, as an ``SSL_CTX`` loads it."""

    name: str  # the SAN: "*.myshopify.com", "api.etsy.com", "127.0.0.1"
    cert_chain_pem: bytes  # the leaf, then the CA
    key_pem: bytes  # PKCS#8, unencrypted
    not_before: dt.datetime
    not_after: dt.datetime
    serial: int

    def renew_at(self) -> dt.datetime:
        """When this leaf is due for renewal: a third of its lifetime before it expires."""
        return self.not_after - (self.not_after - self.not_before) / 3

    def fresh(self, now: dt.datetime) -> bool:
        return self.not_before <= now < self.renew_at()


def _general_name(san: str | IPAddr) -> x509.GeneralName:
    return x509.DNSName(san) if isinstance(san, str) else x509.IPAddress(san)


# --------------------------------------------------------------------------- the CA


class CertificateAuthority:
    """The CA in one data dir, and the leaves it mints.

    Make one with :meth:`create`, :meth:`load` or :meth:`load_or_create`.
    ``intercept`` (the globs elbasy intercepts) decides which names share a
    wildcard leaf; by default the globs the CA was created with.
    """

    def __init__(
        self,
        data_dir: Path,
        cert: x509.Certificate,
        key: ec.EllipticCurvePrivateKey,
        intercept: Sequence[str],
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self.data_dir = data_dir
        self.cert = cert
        self.key = key
        self.intercept = tuple(g.lower() for g in intercept)
        self.cache_size = cache_size
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        self.minted = 0  # leaves minted by this instance (the tests count them)
        self._cache: OrderedDict[str, Leaf] = OrderedDict()
        self._ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        try:
            ext = cert.extensions.get_extension_for_class(x509.NameConstraints).value
        except x509.ExtensionNotFound:
            self.constraints: Constraints | None = None
        else:
            self.constraints = Constraints.from_extension(ext)

    # ------------------------------------------------------------ paths and facts

    @property
    def cert_path(self) -> Path:
        return self.data_dir / CA_CERT_FILE

    @property
    def key_path(self) -> Path:
        return self.data_dir / CA_KEY_FILE

    @property
    def leaves_dir(self) -> Path:
        return self.data_dir / LEAVES_DIR

    @property
    def subject(self) -> str:
        """The subject as ``CN=..., O=..., OU=...`` (in certificate order)."""
        return ", ".join(attr.rfc4514_string() for attr in self.cert.subject)

    @property
    def not_after(self) -> dt.datetime:
        return self.cert.not_valid_after_utc

    @property
    def unconstrained(self) -> bool:
        return self.constraints is None

    def fingerprint(self) -> str:
        """The certificate's SHA-256 fingerprint as colon-separated hex (as ``openssl x509``)."""
        return self.cert.fingerprint(hashes.SHA256()).hex(":").upper()

    # ------------------------------------------------------------ construction

    @classmethod
    def create(
        cls,
        data_dir: Path | str,
        intercept: Sequence[str],
        *,
        now: dt.datetime,
        unconstrained: bool = False,
        force: bool = False,
        hostname: str | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> CertificateAuthority:
        """Make a new CA in ``data_dir``; an existing one is replaced only with ``force``.

        Replacing a CA also deletes the leaves it issued.
        """
        data_dir = Path(data_dir)
        now = _utc(now)
        constraints = None if unconstrained else constraints_for(intercept)
        if (data_dir / CA_KEY_FILE).exists() or (data_dir / CA_CERT_FILE).exists():
            if not force:
                raise CAError(
                    f"a CA already exists in {data_dir}; `elbasy ca init --force` replaces it "
                    "(every client must then trust the new one)"
                )
        _make_private_dir(data_dir)
        if unconstrained:
            log.warning(
                "creating an UNCONSTRAINED CA in %s: anyone who reads its key can impersonate "
                "any host to every client that trusts it",
                data_dir,
            )
        host = hostname if hostname is not None else os.uname().nodename
        common_name = ("elbasy local CA on " + (host or "unknown host"))[:64]
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "elbasy"),
                x509.NameAttribute(
                    NameOID.ORGANIZATIONAL_UNIT_NAME,
                    "created " + now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                ),
            ]
        )
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now - BACKDATE + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
        )
        if constraints is not None:
            builder = builder.add_extension(constraints.extension(), critical=True)
        cert = builder.sign(key, hashes.SHA256())
        meta = {"version": 1, "intercept": list(intercept), "unconstrained": unconstrained}
        # the key first: a crash before the cert is written leaves a pair that does not
        # match, which load() reports, never a certificate whose key is lost
        _write_atomic(data_dir / CA_KEY_FILE, _key_pem(key), 0o600)
        _write_atomic(data_dir / CA_CERT_FILE, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        _write_atomic(data_dir / CA_META_FILE, json.dumps(meta, indent=2).encode() + b"\n", 0o644)
        leaves = data_dir / LEAVES_DIR
        if leaves.is_dir():
            for old in leaves.glob("*.pem"):
                old.unlink()
        log.info("created CA %r in %s", common_name, data_dir)
        return cls(data_dir, cert, key, list(intercept), cache_size)

    @classmethod
    def load(
        cls,
        data_dir: Path | str,
        *,
        intercept: Sequence[str] | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> CertificateAuthority:
        """Load the CA in ``data_dir``; :class:`CAError` if it is missing, damaged or exposed."""
        data_dir = Path(data_dir)
        key_path = data_dir / CA_KEY_FILE
        cert_path = data_dir / CA_CERT_FILE
        try:
            key_bytes = _read(key_path, "the CA key")
            cert_bytes = _read(cert_path, "the CA certificate")
        except FileNotFoundError:
            raise CAError(
                f"no CA in {data_dir}: create one with "
                f"`elbasy ca init --data-dir {data_dir} --intercept GLOB`"
            ) from None
        if data_dir.stat().st_mode & 0o022:
            _check_private(data_dir, "the data dir")
        _check_private(key_path, "the CA key")
        redo = (
            "; restore it from a backup or make a new CA: "
            f"elbasy ca init --force --data-dir {data_dir}"
        )
        try:
            key = serialization.load_pem_private_key(key_bytes, password=None)
        except (ValueError, TypeError) as e:
            raise CAError(f"the CA key {key_path} is damaged or encrypted ({e}){redo}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CAError(f"the CA key {key_path} is not an ECDSA key{redo}")
        try:
            cert = x509.load_pem_x509_certificate(cert_bytes)
        except ValueError as e:
            raise CAError(f"the CA certificate {cert_path} is damaged ({e}){redo}") from None
        if not _same_key(cert, key):
            raise CAError(f"the CA key {key_path} does not belong to {cert_path}{redo}")
        try:
            cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise CAError(f"{cert_path} is not an elbasy CA certificate{redo}")
        recorded: list[str] = []
        meta_path = data_dir / CA_META_FILE
        if meta_path.exists():
            try:
                meta = json.loads(_read(meta_path, "the CA metadata"))
                recorded = [str(g) for g in meta["intercept"]]
            except (ValueError, KeyError, TypeError) as e:
                raise CAError(f"{meta_path} is damaged ({e!r}); delete it or fix it") from None
        return cls(data_dir, cert, key, recorded if intercept is None else intercept, cache_size)

    @classmethod
    def load_or_create(
        cls,
        data_dir: Path | str,
        intercept: Sequence[str],
        *,
        now: dt.datetime,
        unconstrained: bool = False,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> CertificateAuthority:
        """The CA in ``data_dir``, created first if there is none (elbasy's first run)."""
        data_dir = Path(data_dir)
        if not (data_dir / CA_KEY_FILE).exists() and not (data_dir / CA_CERT_FILE).exists():
            return cls.create(
                data_dir, intercept, now=now, unconstrained=unconstrained, cache_size=cache_size
            )
        return cls.load(data_dir, intercept=intercept, cache_size=cache_size)

    # ------------------------------------------------------------ coverage

    def needs_new_ca(self, intercept: Iterable[str], now: dt.datetime | None = None) -> str | None:
        """None if this CA can serve every host of ``intercept``; else why not and what to run.

        With ``now``, a CA within :data:`CA_ROTATE_BEFORE` of its expiry also needs
        replacing.
        """
        globs = list(intercept)
        redo = f"elbasy ca init --force --data-dir {self.data_dir}" + "".join(
            f" --intercept '{g}'" for g in globs
        )
        after = " then trust the new certificate again (elbasy ca trust-help)."
        if now is not None and _utc(now) >= self.not_after - CA_ROTATE_BEFORE:
            return (
                f"the CA in {self.data_dir} expires on {self.not_after:%Y-%m-%d}; "
                f"replace it: {redo}" + ("," + after)
            )
        if self.constraints is None:
            return None
        outside: list[str] = []
        for glob in globs:
            try:
                subtree = subtree_for_glob(glob)
            except CAError as e:
                return f"{e}."
            if not self.constraints.covers(subtree):
                outside.append(glob)
        if not outside:
            return None
        return (
            f"the CA in {self.data_dir} is name-constrained to {self.constraints.summary()} "
            "and cannot issue "
            f"certificates for {', '.join(repr(g) for g in outside)}. Make a new one: {redo},"
            + after
        )

    # ------------------------------------------------------------ leaves

    def san_for(self, server_name: str) -> str:
        """The SAN name of the leaf that serves ``server_name`` (the cache key)."""
        return str(self._san(_normalize_name(server_name)))

    def _san(self, name: str | IPAddr) -> str | IPAddr:
        san = _san_name(name, self.intercept)
        if self.constraints is not None and not self.constraints.permits(san):
            return name  # a wildcard wider than the constraints: the name alone
        return san

    def leaf_for(self, server_name: str, now: dt.datetime) -> Leaf:
        """The leaf that serves ``server_name`` (an SNI name or an IP literal) at ``now``.

        From memory, else from disk, else minted (and written to disk). Raises
        :class:`CAError` for a name that is not a host name or IP address, or one the
        CA's name constraints do not permit, or when the CA has expired.
        """
        now = _utc(now)
        name = _normalize_name(server_name)
        san = self._san(name)
        key = str(san)
        leaf = self._cache.get(key)
        if leaf is not None and leaf.fresh(now):
            self._cache.move_to_end(key)
            return leaf
        if self.constraints is not None and not self.constraints.permits(name):
            raise CAError(
                f"{server_name!r} is outside the CA's name constraints "
                f"({self.constraints.summary()}); "
                + (self.needs_new_ca([*self.intercept, str(name)]) or "")
            )
        if now >= self.not_after:
            raise CAError(
                f"the CA in {self.data_dir} expired on {self.not_after:%Y-%m-%d}; "
                "make a new one: elbasy ca init --force"
            )
        leaf = self._load_leaf(key, now)
        if leaf is None:
            leaf = self._mint(san, now)
        self._cache[key] = leaf
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return leaf

    def cached_names(self) -> list[str]:
        """The SAN names in the memory cache, least recently used first."""
        return list(self._cache)

    def _leaf_path(self, san: str) -> Path:
        return self.leaves_dir / (san + ".pem")

    def _load_leaf(self, san: str, now: dt.datetime) -> Leaf | None:
        """The leaf on disk for ``san`` if it is sound, ours and fresh; else None (mint again)."""
        path = self._leaf_path(san)
        try:
            data = path.read_bytes()
            if stat.S_IMODE(path.stat().st_mode) & 0o077:
                log.warning("leaf %s is readable by other users; minting a new one", path)
                return None
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("cannot read leaf %s (%s); minting a new one", path, e.strerror)
            return None
        try:
            head, marker, tail = data.partition(b"-----BEGIN PRIVATE KEY-----")
            cert = x509.load_pem_x509_certificate(head)
            key = serialization.load_pem_private_key(marker + tail, password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey) or not _same_key(cert, key):
                raise ValueError("the key does not match the certificate")
            cert.verify_directly_issued_by(self.cert)
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            if list(sans) != [_general_name(_san_from_key(san))]:
                raise ValueError("its subjectAltName is not " + san)
        except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound) as e:
            reason = str(e) or type(e).__name__
            log.warning("leaf %s is unusable (%s); minting a new one", path, reason)
            return None
        leaf = Leaf(
            name=san,
            cert_chain_pem=head.strip() + b"\n" + self.cert_pem,
            key_pem=marker + tail,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            serial=cert.serial_number,
        )
        return leaf if leaf.fresh(now) else None

    def _mint(self, san: str | IPAddr, now: dt.datetime) -> Leaf:
        key = ec.generate_private_key(ec.SECP256R1())
        not_before = now - BACKDATE
        not_after = min(not_before + LEAF_LIFETIME, self.not_after)
        name = str(san)
        subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "elbasy")]
        if isinstance(san, str) and len(san) <= 64:
            # no CN for an IP: OpenSSL would check it against the DNS constraints
            subject.insert(0, x509.NameAttribute(NameOID.COMMON_NAME, name))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(subject))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([_general_name(san)]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        key_pem = _key_pem(key)
        _make_private_dir(self.leaves_dir)
        _write_atomic(self._leaf_path(name), cert_pem + key_pem, 0o600)
        self.minted += 1
        log.info("minted a leaf for %s, valid until %s", name, not_after.isoformat())
        return Leaf(
            name=name,
            cert_chain_pem=cert_pem + self.cert_pem,
            key_pem=key_pem,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            serial=cert.serial_number,
        )


def _san_from_key(san: str) -> str | IPAddr:
    ip = _parse_ip(san)
    return san if ip is None else ip
