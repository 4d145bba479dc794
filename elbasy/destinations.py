"""Where elbasy may send a request or a tunnel: the destination rules and the address guard.

Two checks, at two moments:

* by name, when the request head comes (the policy): ``--deny-hosts`` globs
  refuse a host, non-empty ``--allow-hosts`` globs refuse every host they do
  not match, and a CONNECT goes only to the ``--allow-ports`` (443 unless
  configured);
* by address, once the name is resolved (the resolver, whose answer holds
  exactly the addresses the loop dials): an internal address (loopback,
  private, link-local such as 169.254.169.254, CGNAT, multicast,
  unspecified, broadcast, reserved, and those written inside IPv4-mapped,
  NAT64, 6to4 and Teredo addresses) is dropped unless the host matches an
  ``--allow-internal`` glob or the address is one an operator named with
  ``--connect-to``; an address elbasy itself listens on, with its port, is
  dropped always (a request to itself is a loop).

Whatever the reason, the client is told the one line :data:`DENIED` with a
403; the reason goes to elbasy's log.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from fnmatch import fnmatchcase

__all__ = ["DENIED", "Destinations", "Ports", "internal_reason", "host_name"]

#: what a client is told for every refused destination, whatever the reason
DENIED = "elbasy: this destination is not allowed"

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Ports = tuple[tuple[int, int], ...]

_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_SIXTOFOUR = ipaddress.ip_network("2002::/16")
_TEREDO = ipaddress.ip_network("2001::/32")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def _parse(text: str) -> IP | None:
    try:
        return ipaddress.ip_address(text.strip("[]").partition("%")[0])
    except ValueError:
        return None


def _embedded(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 one carries, and the form that carries it."""
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped", ip.ipv4_mapped
    if any(ip in net for net in _NAT64):
        return "NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _SIXTOFOUR:
        assert ip.sixtofour is not None
        return "6to4", ip.sixtofour
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:  # ::a.b.c.d, deprecated but routed by some stacks
        return "IPv4-compatible", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _kind(ip: IP) -> str | None:
    """Why a plain address is internal, or None for a global unicast one."""
    if ip.is_loopback:
        return "loopback"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.version == 4 and ip in _CGNAT:
        return "CGNAT"
    if ip.version == 4 and int(ip) == 0xFFFFFFFF:
        return "broadcast"
    if ip.is_private:
        return "private"
    if ip.is_reserved or not ip.is_global:
        return "reserved"
    return None


def internal_reason(address: str) -> str | None:
    """Why ``address`` (an IP literal) is internal, in a few words; None if it is global.

    >>> internal_reason("::ffff:127.0.0.1")
    'loopback (IPv4-mapped)'
    """
    ip = _parse(address)
    if ip is None:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _TEREDO:
            assert ip.teredo is not None
            server, client = ip.teredo
            for inner in (client, server):
                kind = _kind(inner)
                if kind is not None:
                    return f"{kind} (Teredo)"
            return "Teredo"  # a tunnel endpoint elbasy has no business dialing
        embedded = _embedded(ip)
        if embedded is not None:
            form, inner = embedded
            kind = _kind(inner)
            return f"{kind} ({form})" if kind is not None else None
    return _kind(ip)


def host_name(host: str) -> str:
    """A host as the globs match it: lower case, without IPv6 brackets or a final dot."""
    name = host.lower()
    if name.startswith("[") and name.endswith("]"):
        return name[1:-1]
    return name[:-1] if name.endswith(".") else name


def _plain(ip: IP) -> IP:
    """An IPv4-mapped address as the IPv4 address it is."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_local_address(ip: IP) -> bool:
    """Whether ``ip`` is an address of this machine (loopback, unspecified, or an
    interface's: the kernel lets a socket bind to it)."""
    ip = _plain(ip)
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(ip), 0))
    except OSError:  # EADDRNOTAVAIL: not ours (EAFNOSUPPORT: no IPv6 here at all)
        return False
    return True


#: is_own answers kept; cleared when full (a scan over many hosts costs a parse each)
_OWN_SEEN_KEPT = 4096


class Destinations:
    """The destination rules of one elbasy (see the module docstring)."""

    def __init__(
        self,
        allow_hosts: Sequence[str] = (),
        deny_hosts: Sequence[str] = (),
        allow_ports: Ports | None = ((443, 443),),
        allow_internal: Sequence[str] = (),
        own: Sequence[tuple[str, int]] = (),
    ) -> None:
        self.allow_hosts = tuple(g.lower() for g in allow_hosts)
        self.deny_hosts = tuple(g.lower() for g in deny_hosts)
        self.allow_ports = allow_ports  # None: any port
        self.allow_internal = tuple(g.lower() for g in allow_internal)
        self._own: list[tuple[IP, int]] = []
        # is_own's answers by (host, port): a plain http:// request asks for
        # each one, and a worker pool names the same few origins over and over
        # (parsing the address each time was a fifth of the policy's time)
        self._own_seen: dict[tuple[str, int], bool] = {}
        for host, port in own:
            self.add_own(host, port)

    def add_own(self, host: str, port: int) -> None:
        """An address elbasy listens on (``0.0.0.0`` or ``::``: every local address)."""
        ip = _parse(host)
        if ip is not None:
            self._own.append((_plain(ip), port))
            self._own_seen.clear()

    def is_own(self, host: str, port: int) -> bool:
        """Whether ``host:port``, an IP literal, is an address elbasy listens on."""
        key = (host, port)
        seen = self._own_seen.get(key)
        if seen is None:
            ip = _parse(host)
            seen = ip is not None and self._is_own(_plain(ip), port)
            if len(self._own_seen) >= _OWN_SEEN_KEPT:
                self._own_seen.clear()
            self._own_seen[key] = seen
        return seen

    # ---- by name (the policy, when the head comes) -----------------------------------

    def refusal(self, host: str, port: int, tunnel: bool) -> str | None:
        """Why a request (``tunnel``: a CONNECT) to ``host:port`` is refused, or None."""
        name = host_name(host)
        if any(fnmatchcase(name, g) for g in self.deny_hosts):
            return f"{name} matches --deny-hosts"
        if self.allow_hosts and not any(fnmatchcase(name, g) for g in self.allow_hosts):
            return f"{name} matches no --allow-hosts glob"
        if tunnel and self.allow_ports is not None:
            if not any(low <= port <= high for low, high in self.allow_ports):
                return f"CONNECT to port {port} is not in --allow-ports"
        return None

    # ---- by address (the resolver, before the loop dials) -------------------------------

    def may_be_internal(self, host: str) -> bool:
        """Whether ``host`` may resolve to internal addresses (it matches --allow-internal)."""
        name = host_name(host)
        return any(fnmatchcase(name, g) for g in self.allow_internal)

    def address_refusal(self, address: str, port: int, internal_ok: bool) -> str | None:
        """Why dialing ``address:port`` is refused, or None. ``internal_ok``: the
        host is allowed internal addresses, or an operator chose the address."""
        ip = _parse(address)
        if ip is None:
            return f"{address} is not an IP address"
        if self._is_own(_plain(ip), port):
            return f"{address}:{port} is elbasy itself (a loop)"
        if internal_ok:
            return None
        kind = internal_reason(address)
        return None if kind is None else f"{address} is {kind}"

    def _is_own(self, ip: IP, port: int) -> bool:
        for own, own_port in self._own:
            if port != own_port:
                continue
            if own.is_unspecified:
                if is_local_address(ip):
                    return True
            elif ip == own or ip.is_unspecified:
                return True
        return False
