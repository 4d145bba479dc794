"""The CA's name constraints and the names its leaves carry: pure functions over names.

No files, no keys, no clock; ``cryptography`` only for the x509 name types.

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

``unconstrained=True`` (:meth:`~elbasy.ca.CertificateAuthority.create`) leaves
the extension out (and logs a warning): the key can then impersonate any host
to whoever trusts it.

The SAN of a leaf
=================

The authority mints one leaf per *SAN name*; :func:`san_name` picks it:

* a name one label below an intercept glob ``*.<fixed part>`` (no other glob
  characters) gets the wildcard: under ``*.myshopify.com``, ``shop1`` and
  ``shop2.myshopify.com`` share one leaf for ``*.myshopify.com``. A TLS
  wildcard covers exactly one label, so ``a.b.myshopify.com`` gets its own
  leaf, as does the bare ``myshopify.com``; so does every name under a glob
  like ``api*.etsy.com`` (a ``*.etsy.com`` leaf would serve more than asked).
* any other name gets a leaf for itself; an IP literal gets an iPAddress SAN.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509

from elbasy.ca.errors import CAError

__all__ = [
    "Constraints",
    "IPAddr",
    "IPNetwork",
    "constraints_for",
    "general_name",
    "normalize_name",
    "parse_san",
    "san_name",
    "subtree_for_glob",
]

# the whole package logs as "elbasy.ca", as it did as one module
log = logging.getLogger("elbasy.ca")

_GLOB_CHARS = frozenset("*?[]")
_LABEL_RE = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


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


def normalize_name(server_name: str) -> str | IPAddr:
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


def san_name(name: str | IPAddr, globs: Sequence[str]) -> str | IPAddr:
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


def parse_san(san: str) -> str | IPAddr:
    """A SAN name back from its text (a leaf's cache key): an IP address or the name."""
    ip = _parse_ip(san)
    return san if ip is None else ip


def general_name(san: str | IPAddr) -> x509.GeneralName:
    """The subjectAltName entry for ``san``: a dNSName, or an iPAddress for an address."""
    return x509.DNSName(san) if isinstance(san, str) else x509.IPAddress(san)
