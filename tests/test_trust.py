"""elbasy.trust: which failed client handshakes mean an untrusted CA, warned once per address."""

from __future__ import annotations

from elbasy.errors import HandshakeError, TLSConfigError
from elbasy.trust import (
    CLOSED_AFTER_LEAF,
    HANDSHAKE_RESET,
    WarnedClients,
    client_address,
    distrusts_ca,
    upstream_hint,
)


def test_rejecting_alerts_and_leaving_after_the_leaf_mean_an_untrusted_ca() -> None:
    for reason in ("tlsv1 alert unknown ca", "sslv3 alert bad certificate", CLOSED_AFTER_LEAF):
        assert distrusts_ca("x", HandshakeError(reason, reason=reason)), reason
    assert distrusts_ca(HANDSHAKE_RESET, None)
    for reason in ("wrong version number", "http request", "no shared cipher"):
        assert not distrusts_ca("x", HandshakeError(reason, reason=reason)), reason
    # elbasy's own failure to make a leaf is not the client's distrust
    assert not distrusts_ca("x", TLSConfigError("alert unknown ca", reason="alert unknown ca"))


def test_warned_clients_are_remembered_once_and_bounded() -> None:
    warned = WarnedClients(size=3)
    assert warned.first("10.0.0.1") and not warned.first("10.0.0.1")
    for n in range(2, 6):
        assert warned.first(f"10.0.0.{n}")
    assert len(warned) == 3
    assert warned.first("10.0.0.1")  # forgotten, the oldest: warned again
    assert client_address("127.0.0.1:5000") == "127.0.0.1"
    assert client_address("[::1]:5000") == "::1"


def test_the_upstream_hint_only_where_a_ca_file_helps() -> None:
    assert "--upstream-ca" in upstream_hint(
        "TLS with x failed: certificate verify failed: unable to get local issuer certificate"
    )
    assert "SSL_CERT_FILE" in upstream_hint("certificate verify failed: self-signed certificate")
    assert upstream_hint("TLS with x failed: certificate verify failed: hostname mismatch") == ""
    assert upstream_hint("connection refused") == ""
