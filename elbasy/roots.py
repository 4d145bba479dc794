"""Where elbasy finds the CA certificates it verifies upstreams with: the one place.

elbasy's OpenSSL may be the copy its wheel carries, built on another machine:
the paths it has compiled in (``/etc/ssl/cert.pem``, ``/etc/ssl/certs``) are
Debian's and need not exist here. So the upstream context
(:class:`elbasy.tls.ClientTLS`) loads what :func:`upstream_trust` finds:

1. ``SSL_CERT_FILE`` and/or ``SSL_CERT_DIR``: when either is set, those and
   nothing else (OpenSSL's meaning of the two variables);
2. otherwise the first CA bundle of the mainstream distributions that exists
   (:data:`SYSTEM_BUNDLES`), and the first hashed certificate directory
   (:data:`SYSTEM_DIRS`, used only when it holds ``<hash>.0`` links);
3. when the system has neither, the bundle of ``certifi`` (a dependency).

``--upstream-ca`` is loaded on top of any of them. Nothing here uses the
stdlib :mod:`ssl` module: that one may link another OpenSSL, or none.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

SYSTEM_BUNDLES: Final = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine, Arch, Gentoo
    "/etc/pki/tls/certs/ca-bundle.crt",  # RHEL, Fedora, CentOS, Amazon Linux
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",  # RHEL 7+, Fedora
    "/etc/ssl/ca-bundle.pem",  # openSUSE, SLES
    "/var/lib/ca-certificates/ca-bundle.pem",  # openSUSE's generated copy
    "/etc/ssl/cert.pem",  # Alpine, Arch, macOS
    "/etc/pki/tls/cacert.pem",  # OpenELEC
)
SYSTEM_DIRS: Final = (
    "/etc/ssl/certs",  # Debian, Ubuntu, Alpine, Arch, openSUSE
    "/etc/pki/tls/certs",  # RHEL, Fedora
    "/system/etc/security/cacerts",  # Android
)


@dataclass(frozen=True)
class Trust:
    """The CA file and directory the upstream context loads, and where they came from."""

    cafile: str | None
    capath: str | None
    source: str  # "SSL_CERT_FILE/SSL_CERT_DIR", "system", "certifi" or "none"

    def describe(self) -> str:
        """One line for the log: ``system: /etc/ssl/certs/ca-certificates.crt``."""
        where = ", ".join(p for p in (self.cafile, self.capath) if p)
        return f"{self.source}: {where}" if where else "none found"


def _hashed(directory: str) -> bool:
    try:
        with os.scandir(directory) as entries:
            return any(e.name.endswith(".0") for e in entries)
    except OSError:
        return False


def system_bundle(bundles: Sequence[str] = SYSTEM_BUNDLES) -> str | None:
    """The first CA bundle file of ``bundles`` that exists on this host."""
    return next((p for p in bundles if os.path.isfile(p)), None)


def certifi_bundle() -> str | None:
    """certifi's bundle, or None when certifi is not installed or its file is gone."""
    try:
        import certifi
    except ImportError:
        return None
    path = certifi.where()
    return path if os.path.isfile(path) else None


def upstream_trust(
    environ: Mapping[str, str] = os.environ,
    bundles: Sequence[str] = SYSTEM_BUNDLES,
    dirs: Sequence[str] = SYSTEM_DIRS,
) -> Trust:
    """The CAs to verify upstreams with on this host (the order is in the module's doc)."""
    env_file = environ.get("SSL_CERT_FILE") or None
    env_dir = environ.get("SSL_CERT_DIR") or None
    if env_file or env_dir:
        return Trust(env_file, env_dir, "SSL_CERT_FILE/SSL_CERT_DIR")
    cafile = system_bundle(bundles)
    capath = next((d for d in dirs if _hashed(d)), None)
    if cafile or capath:
        return Trust(cafile, capath, "system")
    bundle = certifi_bundle()
    if bundle:
        return Trust(bundle, None, "certifi")
    return Trust(None, None, "none")
