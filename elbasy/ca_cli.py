"""``elbasy ca ...``: create, inspect and export the interception CA (see :mod:`elbasy.ca`).

Every subcommand takes ``--data-dir`` (``ELBASY_DATA_DIR``; default
``$XDG_DATA_HOME/elbasy``, else ``~/.local/share/elbasy``). None of them starts
the proxy.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from elbasy.trust import system_bundle

if TYPE_CHECKING:
    from elbasy.ca import CertificateAuthority

__all__ = ["ca"]

_F = TypeVar("_F", bound=Callable[..., Any])


def _data_dir_option(f: _F) -> _F:
    return click.option(
        "--data-dir",
        "data_dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        envvar="ELBASY_DATA_DIR",
        metavar="DIR",
        help="Where the CA lives. [default: $XDG_DATA_HOME/elbasy, else ~/.local/share/elbasy]",
    )(f)


def _dir(data_dir: Path | None) -> Path:
    from elbasy.ca import default_data_dir

    return data_dir if data_dir is not None else default_data_dir()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class _Failed(click.ClickException):
    """A CA problem: ``Error: <what and how to fix it>``, exit code 1."""


@click.group("ca")
def ca() -> None:
    """The local certificate authority that TLS interception's certificates chain to.

    The CA is name-constrained to the intercepted hosts (--intercept), so its
    key cannot impersonate any other host. Clients must trust it: see
    `elbasy ca trust-help`.
    """


@ca.command("init")
@_data_dir_option
@click.option(
    "--intercept",
    "intercept",
    multiple=True,
    envvar="ELBASY_INTERCEPT",
    metavar="GLOB",
    help="A host glob elbasy will intercept (e.g. '*.myshopify.com'); repeatable. "
    "The CA may only issue for these hosts.",
)
@click.option(
    "--unconstrained-ca",
    "unconstrained",
    is_flag=True,
    help="No name constraints: the CA can issue for ANY host. Only if you intercept "
    "arbitrary hosts; a leaked key then impersonates every site.",
)
@click.option("--force", is_flag=True, help="Replace an existing CA (clients must re-trust).")
def init(
    data_dir: Path | None, intercept: tuple[str, ...], unconstrained: bool, force: bool
) -> None:
    """Create the CA (ECDSA P-256, 10 years) in the data dir."""
    from elbasy.ca import CA_CERT_FILE, CA_KEY_FILE, CAError, CertificateAuthority

    where = _dir(data_dir)
    exists = (where / CA_KEY_FILE).exists() or (where / CA_CERT_FILE).exists()
    try:
        if exists and not force:
            current = CertificateAuthority.load(where)
            problem = current.needs_new_ca(intercept, _now())
            if problem is None and unconstrained and not current.unconstrained:
                problem = (
                    f"the CA in {where} is name-constrained; replace it with "
                    f"`elbasy ca init --force --unconstrained-ca --data-dir {where}`"
                )
            if problem is not None:
                raise _Failed(problem)
            click.echo(f"A CA already exists in {where} and covers these hosts; nothing to do.")
            _describe(current)
            return
        if unconstrained:
            click.secho(
                "WARNING: creating an UNCONSTRAINED CA. Anyone who reads its key can "
                "impersonate ANY site to every client that trusts it.",
                err=True,
                fg="red",
                bold=True,
            )
        authority = CertificateAuthority.create(
            where, intercept, now=_now(), unconstrained=unconstrained, force=force
        )
    except CAError as e:
        raise _Failed(str(e)) from None
    click.echo(f"Created a CA in {where}.")
    if not unconstrained:
        for glob in intercept:
            click.echo(f"  intercept {glob!r}: {_mapping(glob)}")
    _describe(authority)
    click.echo("Next: make clients trust it; `elbasy ca trust-help` shows how.")


def _mapping(glob: str) -> str:
    """What name constraint an intercept glob became, and whether it is wider."""
    from elbasy.ca import subtree_for_glob

    subtree = subtree_for_glob(glob)
    if not isinstance(subtree, str):
        return f"permits the address {subtree.network_address}"
    if glob.lower().rstrip(".") == subtree:
        return f"permits {subtree} and every name under it"
    if glob.lower().rstrip(".") == "*." + subtree:
        return f"permits {subtree} and every name under it (the bare name too)"
    return f"not expressible as a constraint; permits its nearest parent {subtree} instead"


@ca.command("show")
@_data_dir_option
def show(data_dir: Path | None) -> None:
    """Print the CA's subject, fingerprint, name constraints and expiry."""
    from elbasy.ca import CAError, CertificateAuthority

    try:
        authority = CertificateAuthority.load(_dir(data_dir))
    except CAError as e:
        raise _Failed(str(e)) from None
    _describe(authority)


def _describe(authority: CertificateAuthority) -> None:
    from elbasy.ca import CA_ROTATE_BEFORE

    rotate = authority.not_after - CA_ROTATE_BEFORE
    rows = [
        ("certificate", str(authority.cert_path)),
        ("key", str(authority.key_path)),
        ("subject", authority.subject),
        ("SHA-256", authority.fingerprint()),
        ("not before", f"{authority.cert.not_valid_before_utc:%Y-%m-%d %H:%M:%SZ}"),
        ("not after", f"{authority.not_after:%Y-%m-%d %H:%M:%SZ} (rotate after {rotate:%Y-%m-%d})"),
    ]
    if authority.constraints is None:
        rows.append(("constraints", "NONE: this CA can issue for any host"))
    else:
        for i, line in enumerate(authority.constraints.describe()):
            rows.append(("constraints" if i == 0 else "", line))
    rows.append(("intercept", ", ".join(authority.intercept) or "(none recorded)"))
    for label, value in rows:
        click.echo(f"{label + ':' if label else '':<13}{value}")
    if _now() >= rotate:
        click.secho(
            f"The CA expires on {authority.not_after:%Y-%m-%d}: replace it with "
            "`elbasy ca init --force` and trust the new one.",
            err=True,
            fg="yellow",
        )


def _read_cert(data_dir: Path) -> tuple[Path, bytes, str]:
    """(path, PEM, SHA-256 fingerprint) of the CA certificate; the key is not needed."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    from elbasy.ca import CA_CERT_FILE

    path = data_dir / CA_CERT_FILE
    try:
        pem = path.read_bytes()
        cert = x509.load_pem_x509_certificate(pem)
    except FileNotFoundError:
        raise _Failed(
            f"no CA in {data_dir}: create one with "
            f"`elbasy ca init --data-dir {data_dir} --intercept GLOB`"
        ) from None
    except (OSError, ValueError) as e:
        raise _Failed(f"cannot read the CA certificate {path}: {e}") from None
    return path, pem, cert.fingerprint(hashes.SHA256()).hex(":").upper()


@ca.command("export")
@_data_dir_option
def export(data_dir: Path | None) -> None:
    """Print the CA certificate (PEM) on stdout."""
    _, pem, _ = _read_cert(_dir(data_dir))
    click.echo(pem.decode("ascii"), nl=False)


@ca.command("trust-help")
@_data_dir_option
def trust_help(data_dir: Path | None) -> None:
    """Print the exact steps that make clients trust the CA."""
    where = _dir(data_dir)
    cert, _, fingerprint = _read_cert(where)
    bundle = where / "bundle.pem"
    system = system_bundle()
    system_text = system or "<your system CA bundle>"
    lines = [
        f"The elbasy CA certificate is {cert}",
        f"  SHA-256 {fingerprint}",
        "Trust it only where elbasy intercepts traffic. Pick what your clients use.",
        "",
        "System store, Debian / Ubuntu (curl, wget, Go, Python ssl, most tools):",
        f"  sudo cp {cert} /usr/local/share/ca-certificates/elbasy-ca.crt",
        "  sudo update-ca-certificates",
        "  undo: sudo rm /usr/local/share/ca-certificates/elbasy-ca.crt && "
        "sudo update-ca-certificates --fresh",
        "",
        "System store, RHEL / Fedora / CentOS / Amazon Linux:",
        f"  sudo cp {cert} /etc/pki/ca-trust/source/anchors/elbasy-ca.pem",
        "  sudo update-ca-trust",
        "  undo: sudo rm /etc/pki/ca-trust/source/anchors/elbasy-ca.pem && sudo update-ca-trust",
        "",
        "Per process, without touching the system store. SSL_CERT_FILE, REQUESTS_CA_BUNDLE",
        "and curl --cacert REPLACE the default roots, and hosts elbasy does not intercept",
        "still show their real certificates, so give them a combined bundle:",
        f"  cat {system_text} {cert} > {bundle}",
    ]
    if system is None:
        lines.append("  (no system bundle found here; `python -m certifi` prints certifi's)")
    lines += [
        "",
        "  OpenSSL-based clients (Python ssl, urllib, httpx, Ruby, Go on Linux):",
        f"    export SSL_CERT_FILE={bundle}",
        "  Python requests (it uses certifi's bundle otherwise):",
        f"    export REQUESTS_CA_BUNDLE={bundle}",
        "  Node.js (NODE_EXTRA_CA_CERTS adds to the built-in roots, so the CA alone will do):",
        f"    export NODE_EXTRA_CA_CERTS={cert}",
        "  curl:",
        f"    curl --cacert {bundle} https://...",
        f"    (or --cacert {cert} when every host you call is intercepted)",
        "",
        "Rebuild the bundle when the system roots change or the CA is re-created",
        "(`elbasy ca init --force`); remove the old CA from the system store then too.",
    ]
    click.echo("\n".join(lines))
