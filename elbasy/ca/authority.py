"""The authority: the CA itself, and the leaves it mints and renews.

Plain Python over ``cryptography``; no sockets, no event loop. Wherever time
matters the caller passes ``now`` (an aware :class:`datetime`), so tests and
the loop decide what the clock says. Which names a CA may certify and which
SAN a leaf carries are :mod:`elbasy.ca.constraints`; where and how the CA and
its leaves are kept is :mod:`elbasy.ca.storage`.

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

Leaves
======

:meth:`CertificateAuthority.leaf_for` mints one leaf per *SAN name*: one
wildcard leaf for the names one label below an intercept glob
``*.<fixed part>``, else one leaf per name (the rules are in
:mod:`elbasy.ca.constraints`). A name the CA's constraints do not permit
raises :class:`CAError` (a client would reject that leaf anyway).

Each leaf has its own ECDSA P-256 key. Key generation costs about as much as
the signature, so there is nothing to save by sharing one, and a per-leaf key
keeps each ``leaves/<name>.pem`` self-contained (cert and key can never
disagree across files), gives every renewal a fresh key, and bounds what one
leaked leaf file impersonates to its own name for its own 30 days.

Validity: 30 days (never past the CA's own expiry), back-dated one hour.
A leaf is renewed when less than a third of its lifetime is left (10 days),
so clients never see one near expiry. Leaves are cached in memory (an LRU of
``cache_size`` entries) and on disk, at most :attr:`CertificateAuthority.leaf_files`
files (the least recently used go first, see :func:`elbasy.ca.storage.prune_leaves`);
a name is minted again only when its leaf is missing, damaged, issued by
another CA, or due for renewal. ``leaf_for(..., may_mint=...)`` lets the caller
refuse a mint (elbasy's rate limit) while leaves already made are still served.

Not thread-safe: one :class:`CertificateAuthority` per worker, used from the
loop's thread.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import textwrap
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from elbasy.ca import storage
from elbasy.ca.constraints import (
    Constraints,
    IPAddr,
    constraints_for,
    general_name,
    normalize_name,
    parse_san,
    san_name,
    subtree_for_glob,
)
from elbasy.ca.errors import CAError

__all__ = [
    "BACKDATE",
    "CA_LIFETIME",
    "CA_ROTATE_BEFORE",
    "DEFAULT_CACHE_SIZE",
    "DEFAULT_LEAF_FILES",
    "LEAF_LIFETIME",
    "CertificateAuthority",
    "Leaf",
]

# the whole package logs as "elbasy.ca", as it did as one module
log = logging.getLogger("elbasy.ca")

CA_LIFETIME: Final = dt.timedelta(days=3650)
CA_ROTATE_BEFORE: Final = dt.timedelta(days=365)
LEAF_LIFETIME: Final = dt.timedelta(days=30)
BACKDATE: Final = dt.timedelta(hours=1)
DEFAULT_CACHE_SIZE: Final = 1024
DEFAULT_LEAF_FILES: Final = 1000


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
        #: the most leaf files kept on disk (the least recently used are deleted)
        self.leaf_files = DEFAULT_LEAF_FILES
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
        return self.data_dir / storage.CA_CERT_FILE

    @property
    def key_path(self) -> Path:
        return self.data_dir / storage.CA_KEY_FILE

    @property
    def leaves_dir(self) -> Path:
        return self.data_dir / storage.LEAVES_DIR

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
        if storage.has_ca(data_dir):
            if not force:
                raise CAError(
                    f"a CA already exists in {data_dir}; `elbasy ca init --force` replaces it "
                    "(every client must then trust the new one)"
                )
        storage.make_private_dir(data_dir)
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
        storage.save_ca(data_dir, cert, key, intercept, unconstrained)
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
        cert, key, recorded = storage.load_ca(data_dir)
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
        if not storage.has_ca(data_dir):
            return cls.create(
                data_dir, intercept, now=now, unconstrained=unconstrained, cache_size=cache_size
            )
        return cls.load(data_dir, intercept=intercept, cache_size=cache_size)

    # ------------------------------------------------------------ coverage

    def needs_new_ca(
        self,
        intercept: Iterable[str],
        now: dt.datetime | None = None,
        *,
        asked: Iterable[str] | None = None,
    ) -> str | None:
        """None if this CA can serve every host of ``intercept``; else why not and what to run.

        With ``now``, a CA within :data:`CA_ROTATE_BEFORE` of its expiry also needs
        replacing. ``asked``: the globs the command to run names with
        ``--intercept`` (default: all of ``intercept``); ``elbasy ca init`` adds
        the enabled rules' hosts itself, so elbasy names only the user's own. The
        text is a few lines of at most 100 columns, the command on a line of its own.
        """
        globs = list(intercept)
        redo = f"elbasy ca init --force --data-dir {self.data_dir}" + "".join(
            f" --intercept '{g}'" for g in (globs if asked is None else asked)
        )
        if now is not None and _utc(now) >= self.not_after - CA_ROTATE_BEFORE:
            why = f"the CA in {self.data_dir} expires on {self.not_after:%Y-%m-%d}."
            return _with_command(why, redo)
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
        permitted = [*self.constraints.dns, *(str(n) for n in self.constraints.ips)]
        why = (
            f"the CA in {self.data_dir} cannot issue certificates for "
            f"{_some(repr(g) for g in outside)} (it is name-constrained to {_some(permitted)})."
        )
        return _with_command(why, redo)

    # ------------------------------------------------------------ leaves

    def san_for(self, server_name: str) -> str:
        """The SAN name of the leaf that serves ``server_name`` (the cache key)."""
        return str(self._san(normalize_name(server_name)))

    def _san(self, name: str | IPAddr) -> str | IPAddr:
        san = san_name(name, self.intercept)
        if self.constraints is not None and not self.constraints.permits(san):
            return name  # a wildcard wider than the constraints: the name alone
        return san

    def leaf_for(
        self,
        server_name: str,
        now: dt.datetime,
        may_mint: Callable[[], bool] | None = None,
    ) -> Leaf:
        """The leaf that serves ``server_name`` (an SNI name or an IP literal) at ``now``.

        From memory, else from disk, else minted (and written to disk). Raises
        :class:`CAError` for a name that is not a host name or IP address, or one the
        CA's name constraints do not permit, or when the CA has expired, or when
        ``may_mint`` (asked only when a leaf is to be minted) says no.
        """
        now = _utc(now)
        name = normalize_name(server_name)
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
            if may_mint is not None and not may_mint():
                raise CAError(
                    f"not minting a leaf for {key!r} now: too many new leaves "
                    "(--leaf-mint-rate, --leaf-mint-burst)"
                )
            leaf = self._mint(san, now)
        self._cache[key] = leaf
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return leaf

    def cached_names(self) -> list[str]:
        """The SAN names in the memory cache, least recently used first."""
        return list(self._cache)

    def _load_leaf(self, san: str, now: dt.datetime) -> Leaf | None:
        """The leaf on disk for ``san`` if it is sound, ours and fresh; else None (mint again)."""
        found = storage.read_leaf(self.leaves_dir, san, general_name(parse_san(san)), self.cert)
        if found is None:
            return None
        cert, cert_pem, key_pem = found
        storage.touch_leaf(self.leaves_dir, san)
        leaf = Leaf(
            name=san,
            cert_chain_pem=cert_pem + self.cert_pem,
            key_pem=key_pem,
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
            .add_extension(x509.SubjectAlternativeName([general_name(san)]), critical=False)
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
        key_pem = storage.key_pem(key)
        storage.write_leaf(self.leaves_dir, name, cert_pem, key_pem)
        storage.prune_leaves(self.leaves_dir, self.leaf_files, keep=name)
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


#: how many items a message lists before "and N more"
_LISTED = 4
_COLUMNS = 92  # 100 with the "Error: " click puts before the first line


def _some(items: Iterable[str]) -> str:
    """The first few of ``items``, comma-separated, then how many more there are."""
    shown = list(items)
    if len(shown) <= _LISTED + 1:
        return ", ".join(shown)
    return ", ".join(shown[:_LISTED]) + f" and {len(shown) - _LISTED} more"


def _with_command(why: str, command: str) -> str:
    """``why`` wrapped to a few readable lines, then the command that mends it on its own."""
    text = why + " Make a new one, then trust the new certificate again (elbasy ca trust-help):"
    prose = textwrap.fill(text, _COLUMNS, break_long_words=False, break_on_hyphens=False)
    return f"{prose}\n  {command}"
