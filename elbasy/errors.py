"""elbasy's exceptions, split by whose fault a failure is.

`RemoteProtocolError` means a peer (client or upstream) sent something
elbasy must refuse; `status_hint` is what the client is told. Anything else
raised inside elbasy is ours, and becomes a 500 without killing the worker.
"""

from __future__ import annotations


class ElbasyError(Exception):
    """Base for every error elbasy raises on purpose."""


class RemoteProtocolError(ElbasyError):
    """The peer broke HTTP: answer `status_hint` and close."""

    def __init__(self, message: str, status_hint: int = 400) -> None:
        super().__init__(message)
        self.status_hint = status_hint


class LocalProtocolError(ElbasyError):
    """elbasy itself tried to do something HTTP does not allow (a bug)."""


class TLSError(ElbasyError):
    """A TLS failure, with the library's own reason.

    ``peer_fault`` keeps the split above: True when the other end caused it
    (a client that broke its handshake, an upstream whose certificate fails a
    check), False when it is elbasy's (a certificate, key or CA file that does
    not load). ``reason`` is OpenSSL's text, ``code`` its packed error (0 if
    none), ``verify_result`` the X.509 verify result (0: none or OK).
    """

    peer_fault = False

    def __init__(
        self, message: str, *, reason: str = "", code: int = 0, verify_result: int = 0
    ) -> None:
        super().__init__(message)
        self.reason = reason or message
        self.code = code
        self.verify_result = verify_result


class CertificateVerifyError(TLSError):
    """The upstream's certificate failed a check; the message names it ("hostname mismatch")."""

    peer_fault = True


class HandshakeError(TLSError):
    """The peer broke the handshake: not TLS, no shared cipher or version, or an alert."""

    peer_fault = True


class TLSConfigError(TLSError):
    """elbasy's own TLS setup is wrong: a certificate, key or CA file that does not load."""
