"""The CA's data dir: its files, how they are written and read, and the leaves kept there.

No signing and no names: what to put in the files is decided by
:mod:`elbasy.ca.authority`; this module keeps them private, whole and
readable, and says clearly what is wrong with one that is not.

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

``leaves/`` is a cache: a leaf file that is missing, damaged, readable by
others, issued by another CA or for another name is not used (the authority
mints the name again and overwrites it), and making a new CA empties it.
It is bounded: :func:`prune_leaves` deletes the least recently used files
beyond a cap (by mtime; :func:`touch_leaf` marks a file used when it is
loaded, since atime is often not kept).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from elbasy.ca.errors import CAError

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "CA_META_FILE",
    "LEAVES_DIR",
    "default_data_dir",
    "has_ca",
    "key_pem",
    "load_ca",
    "make_private_dir",
    "prune_leaves",
    "read_leaf",
    "save_ca",
    "touch_leaf",
    "write_leaf",
]

# the whole package logs as "elbasy.ca", as it did as one module
log = logging.getLogger("elbasy.ca")

CA_CERT_FILE: Final = "ca.pem"
CA_KEY_FILE: Final = "ca-key.pem"
CA_META_FILE: Final = "ca.json"
LEAVES_DIR: Final = "leaves"


def default_data_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_DATA_HOME/elbasy`` if set to an absolute path, else ``~/.local/share/elbasy``."""
    env = os.environ if env is None else env
    xdg = env.get("XDG_DATA_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "elbasy"
    home = env.get("HOME") or os.path.expanduser("~")
    return Path(home) / ".local" / "share" / "elbasy"


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


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and its parents) mode 0700, or tighten it to 0700 if it exists."""
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


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """``key`` as unencrypted PKCS#8 PEM, as the CA key and leaf files hold it."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _same_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    return cert.public_key() == key.public_key()


# --------------------------------------------------------------------------- the CA


def has_ca(data_dir: Path) -> bool:
    """Whether ``data_dir`` holds a CA (its key or its certificate, whole or not)."""
    return (data_dir / CA_KEY_FILE).exists() or (data_dir / CA_CERT_FILE).exists()


def save_ca(
    data_dir: Path,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    intercept: Sequence[str],
    unconstrained: bool,
) -> None:
    """Write a new CA into ``data_dir`` (which exists) and delete the old CA's leaves."""
    meta = {"version": 1, "intercept": list(intercept), "unconstrained": unconstrained}
    # the key first: a crash before the cert is written leaves a pair that does not
    # match, which load_ca() reports, never a certificate whose key is lost
    _write_atomic(data_dir / CA_KEY_FILE, key_pem(key), 0o600)
    _write_atomic(data_dir / CA_CERT_FILE, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write_atomic(data_dir / CA_META_FILE, json.dumps(meta, indent=2).encode() + b"\n", 0o644)
    leaves = data_dir / LEAVES_DIR
    if leaves.is_dir():
        for old in leaves.glob("*.pem"):
            old.unlink()


def load_ca(
    data_dir: Path,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, list[str]]:
    """The CA in ``data_dir``: (certificate, key, the intercept globs recorded with it).

    :class:`CAError` if it is missing, damaged or exposed, saying what to run.
    """
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
        f"; restore it from a backup or make a new CA: elbasy ca init --force --data-dir {data_dir}"
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
    return cert, key, recorded


# --------------------------------------------------------------------------- leaves


def _leaf_path(leaves_dir: Path, name: str) -> Path:
    return leaves_dir / (name + ".pem")


def read_leaf(
    leaves_dir: Path, name: str, san: x509.GeneralName, issuer: x509.Certificate
) -> tuple[x509.Certificate, bytes, bytes] | None:
    """The leaf file for SAN ``name``, if it is sound: (certificate, its PEM, its key's PEM).

    Sound means private to its owner, readable, a certificate with the key that
    belongs to it, signed by ``issuer`` and for exactly ``san``. Anything else is
    logged and gives None (the name is to be minted again); whether the leaf is
    still fresh is the caller's question.
    """
    path = _leaf_path(leaves_dir, name)
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
        cert.verify_directly_issued_by(issuer)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if list(sans) != [san]:
            raise ValueError("its subjectAltName is not " + name)
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound) as e:
        reason = str(e) or type(e).__name__
        log.warning("leaf %s is unusable (%s); minting a new one", path, reason)
        return None
    return cert, head.strip() + b"\n", marker + tail


def write_leaf(leaves_dir: Path, name: str, cert: bytes, key: bytes) -> None:
    """Keep the leaf for SAN ``name``: its certificate then its key (PEM), one file, 0600."""
    make_private_dir(leaves_dir)
    _write_atomic(_leaf_path(leaves_dir, name), cert + key, 0o600)


def touch_leaf(leaves_dir: Path, name: str) -> None:
    """Mark the leaf file for ``name`` as just used (its mtime), for :func:`prune_leaves`."""
    with contextlib.suppress(OSError):
        os.utime(_leaf_path(leaves_dir, name))


def prune_leaves(leaves_dir: Path, cap: int, keep: str | None = None) -> int:
    """Delete the least recently used leaf files beyond ``cap``; how many were deleted.

    Used means written or loaded (:func:`touch_leaf`): the oldest mtime goes
    first. ``keep`` (a SAN name, the leaf just written) is never deleted. Only
    ``<name>.pem`` files count; a file another process deletes first is skipped.
    """
    if cap < 0:
        raise ValueError("cap must be at least 0")
    spared = None if keep is None else keep + ".pem"
    found: list[tuple[float, str]] = []
    try:
        with os.scandir(leaves_dir) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.name.endswith(".pem"):
                    continue
                try:
                    found.append((entry.stat(follow_symlinks=False).st_mtime, entry.name))
                except OSError:
                    continue
    except FileNotFoundError:
        return 0
    excess = len(found) - cap
    if excess <= 0:
        return 0
    found.sort()
    deleted = 0
    for _, file_name in found:
        if deleted >= excess:
            break
        if file_name == spared:
            continue
        try:
            os.unlink(leaves_dir / file_name)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot delete the old leaf %s (%s)", leaves_dir / file_name, e.strerror)
            continue
        deleted += 1
    if deleted:
        log.info("deleted %d least recently used leaf files (the cap is %d)", deleted, cap)
    return deleted
