"""The certificate of ``--listen-tls``: what a client checks when it reaches the proxy over TLS.

An operator may give one (``--tls-cert``/``--tls-key``, e.g. from the company's
CA for the proxy's DNS name). Without them elbasy makes its own in the data
dir: a self-signed P-256 certificate for the listener's names (its address,
``localhost`` and this host's name), kept in ``listener.pem`` /
``listener-key.pem`` and made again only when the names change. It is not
signed by elbasy's CA on purpose: that CA is name-constrained to the API hosts
it intercepts, so a certificate for the proxy's own names under it would break
its constraints. Clients trust the file itself (curl ``--proxy-cacert``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from elbasy.ca.errors import CAError
from elbasy.ca.storage import _write_atomic, key_pem, make_private_dir

__all__ = ["LISTENER_CERT", "listener_certificate", "read_listener_certificate"]

LISTENER_CERT = "listener.pem"
LISTENER_KEY = "listener-key.pem"
VALID_DAYS = 825  # the longest a server certificate is accepted by some clients


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _names_of(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(n.value) for n in san}


def listener_certificate(
    data_dir: Path, names: Sequence[str], now: dt.datetime | None = None
) -> tuple[bytes, bytes, Path]:
    """(certificate PEM, key PEM, the certificate's path) for ``names``: the one
    kept in ``data_dir`` when it covers them and is valid a month more, else a new
    one written there (the key readable by its owner only)."""
    now = now or dt.datetime.now(dt.UTC)
    wanted = {n for n in names if n}
    cert_path, key_path = data_dir / LISTENER_CERT, data_dir / LISTENER_KEY
    if cert_path.exists() and key_path.exists():
        try:
            cert_pem, kept_key = cert_path.read_bytes(), key_path.read_bytes()
            cert = x509.load_pem_x509_certificate(cert_pem)
            fresh = cert.not_valid_after_utc > now + dt.timedelta(days=30)
            if fresh and wanted <= _names_of(cert):
                return cert_pem, kept_key, cert_path
        except (OSError, ValueError):
            pass  # unreadable or not a certificate: made again below
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "elbasy proxy listener")])
    ordered = sorted(wanted)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in ordered]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    try:
        make_private_dir(data_dir)
        _write_atomic(key_path, key_pem(key))
        _write_atomic(cert_path, cert_pem, 0o644)
    except OSError as e:
        raise CAError(f"cannot write the --listen-tls certificate in {data_dir}: {e}") from None
    return cert_pem, key_pem(key), cert_path


def read_listener_certificate(cert_file: str, key_file: str) -> tuple[bytes, bytes]:
    """An operator's --tls-cert and --tls-key, read (their pairing is checked when
    OpenSSL loads them)."""
    try:
        return Path(cert_file).read_bytes(), Path(key_file).read_bytes()
    except OSError as e:
        raise CAError(f"cannot read the --listen-tls certificate: {e}") from None
