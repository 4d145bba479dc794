"""Request targets: the CONNECT authority and the absolute-form URL."""

from __future__ import annotations

import ipaddress
import re

from elbasy.errors import RemoteProtocolError

# RFC 3986 reg-name as hosts use it in practice: labels of letters, digits,
# hyphens and underscores, separated by dots.
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_-]{1,63})*\.?$"
)


def check_host(host: str) -> str:
    """Return the host lower-cased if it is a hostname or an IP literal."""
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise RemoteProtocolError(f"bad IPv6 address in target: {host!r}") from None
    if not _HOSTNAME.match(host):
        raise RemoteProtocolError(f"bad host in target: {host!r}")
    return host.lower().rstrip(".")


def check_port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 5:
        raise RemoteProtocolError(f"bad port in target: {text!r}")
    port = int(text)
    if not 0 < port < 65536:
        raise RemoteProtocolError(f"port out of range in target: {port}")
    return port


def parse_authority(target: str) -> tuple[str, int]:
    """host:port of a CONNECT request (RFC 9110 §9.3.6); the port is required."""
    host, sep, port = target.rpartition(":")
    if not sep or not host:
        raise RemoteProtocolError(f"CONNECT target must be host:port, got {target!r}")
    if "%" in host:
        # an IPv6 zone (fe80::1%eth0) names an interface of the client's
        # machine, never one of elbasy's (and Python keeps its text as
        # written, case and all): no client can mean it in a CONNECT
        raise RemoteProtocolError(f"IPv6 zone in CONNECT target: {target!r}")
    return check_host(host), check_port(port)
