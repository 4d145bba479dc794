"""Telling the user that a certificate is not trusted, and what to do about it.

Two sides: a client that does not trust elbasy's CA (the likeliest first
problem with interception: its handshake fails with an ``unknown ca`` or
``bad certificate`` alert, or it resets the connection once it has seen the
leaf), and an upstream whose certificate elbasy cannot verify (a private CA
that ``--upstream-ca`` or ``SSL_CERT_FILE`` should name). Plain Python: the
policy hands in what the loop reported.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

from elbasy.errors import HandshakeError

__all__ = [
    "CLOSED_AFTER_LEAF",
    "HANDSHAKE_RESET",
    "WarnedClients",
    "client_address",
    "distrusts_ca",
    "untrusted_ca_warning",
    "upstream_hint",
]

#: the reason of a TLS_FAILED ending whose client reset the connection mid-handshake
#: (the loop's words; often a client that rejected elbasy's certificate)
HANDSHAKE_RESET: Final = "the client reset the connection during the handshake"

#: client addresses remembered as warned (the oldest is forgotten past this)
WARNED_CLIENTS: Final = 4096

#: OpenSSL's reasons for the alerts a client sends when it rejects a certificate
#: ("tlsv1 alert unknown ca", "sslv3 alert bad certificate", "... certificate unknown")
_REJECTING_ALERTS: Final = (
    "alert unknown ca",
    "alert bad certificate",
    "alert certificate unknown",
)


#: why a client's handshake failed when it closed the connection, with no alert,
#: once elbasy's certificate had gone out (elbasy.tls.ServerTLS.failure)
CLOSED_AFTER_LEAF: Final = "the client closed the connection once it had elbasy's certificate"

#: OpenSSL's verify results that say elbasy lacks the upstream's CA (not, say, a
#: hostname mismatch or an expired certificate, which no CA file mends)
_UNKNOWN_ISSUER: Final = ("issuer certificate", "self-signed", "self signed")


def distrusts_ca(reason: str, error: BaseException | None) -> bool:
    """Whether a client's failed handshake probably means it does not trust elbasy's CA:
    it answered the leaf with a rejecting alert, or reset the connection mid-handshake."""
    if reason == HANDSHAKE_RESET:
        return True
    if not isinstance(error, HandshakeError):
        return False
    if error.reason == CLOSED_AFTER_LEAF:
        return True
    text = error.reason.lower()
    return any(alert in text for alert in _REJECTING_ALERTS)


def client_address(client: str) -> str:
    """The address of ``host:port`` (``[::1]:5000`` gives ``::1``)."""
    host, sep, _ = client.rpartition(":")
    return host.strip("[]") if sep else client


class WarnedClients:
    """The client addresses already warned about, at most ``size`` of them (LRU)."""

    def __init__(self, size: int = WARNED_CLIENTS) -> None:
        self.size = size
        self._seen: OrderedDict[str, None] = OrderedDict()

    def first(self, address: str) -> bool:
        """True the first time ``address`` is seen (again once it was forgotten)."""
        if address in self._seen:
            self._seen.move_to_end(address)
            return False
        self._seen[address] = None
        if len(self._seen) > self.size:
            self._seen.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._seen)


def untrusted_ca_warning(address: str, target: str, reason: str, ca_file: str | None) -> str:
    """The one warning for a client that probably does not trust elbasy's CA."""
    where = f"the CA file {ca_file}" if ca_file else "elbasy's CA (`elbasy ca export`)"
    return (
        f"client {address} probably does not trust elbasy's CA (TLS for {target}: {reason}); "
        f"make it trust {where} (system store, SSL_CERT_FILE, REQUESTS_CA_BUNDLE or "
        "curl --cacert; `elbasy ca trust-help` shows how); said once per client address"
    )


def upstream_hint(reason: str) -> str:
    """What to add to an upstream failure's log line when elbasy could not verify
    the upstream's certificate; else ""."""
    text = reason.lower()
    if not any(why in text for why in _UNKNOWN_ISSUER):
        return ""
    return (
        " (if this upstream's certificate comes from a private CA, give elbasy its file with "
        "--upstream-ca, or set SSL_CERT_FILE to a bundle that holds it)"
    )
