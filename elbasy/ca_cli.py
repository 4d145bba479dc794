"""``elbasy ca ...``: create, inspect and export the interception CA (see :mod:`elbasy.ca`).

Every subcommand takes ``--data-dir`` (default ``$XDG_DATA_HOME/elbasy``, else
``~/.local/share/elbasy``), and ``init`` ``--intercept`` and ``--unconstrained-ca``:
the same settings as ``elbasy``'s options, which may come before the subcommand
(``elbasy --data-dir D ca init``), in ``ELBASY_DATA_DIR`` and the others, or in
the config file. None of them starts the proxy.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from elbasy.roots import system_bundle

if TYPE_CHECKING:
    from elbasy.ca import CertificateAuthority
    from elbasy.config import Config

__all__ = ["ca"]

_F = TypeVar("_F", bound=Callable[..., Any])


def _data_dir_option(f: _F) -> _F:
    return click.option(
        "--data-dir",
        "data_dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        metavar="DIR",
        help="Where the CA lives. [default: $XDG_DATA_HOME/elbasy, else ~/.local/share/elbasy]",
    )(f)


def _settings() -> Config | None:
    """The settings of ``elbasy``'s options (``elbasy --data-dir D ca ...``, the
    environment, the config file), when run as its subcommand."""
    from elbasy.config import Config

    return click.get_current_context().find_object(Config)


def _dir(data_dir: Path | None) -> Path:
    """The data dir: this subcommand's ``--data-dir``, else ``elbasy``'s setting."""
    from elbasy.ca import default_data_dir

    if data_dir is not None:
        return data_dir
    config = _settings()
    if config is not None and config.data_dir is not None:
        return Path(config.data_dir)
    return default_data_dir()


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
    config = _settings()
    if config is not None:  # `elbasy --unconstrained-ca ca init`, the environment, the file
        unconstrained = unconstrained or config.unconstrained_ca
    asked, intercept = _hosts_to_cover(intercept)
    exists = (where / CA_KEY_FILE).exists() or (where / CA_CERT_FILE).exists()
    try:
        if exists and not force:
            current = CertificateAuthority.load(where)
            problem = current.needs_new_ca(intercept, _now(), asked=asked)
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
        for glob in asked:
            click.echo(f"  intercept {glob!r}: {_mapping(glob)}")
        rules_hosts = [g for g in intercept if g not in asked]
        if rules_hosts:
            _wrapped("  and the enabled rules' hosts, which elbasy intercepts too: ", rules_hosts)
    _describe(authority)
    click.echo("Next: make clients trust it; `elbasy ca trust-help` shows how.")


def _hosts_to_cover(intercept: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the globs the user asked for, every host the CA must cover).

    The CA must serve what plain ``elbasy`` run with the same settings
    intercepts: its --intercept globs and the enabled rules' hosts
    (:func:`elbasy.server.intercepted_hosts`, the same list the first run makes
    its CA for), so ``ca init`` covers those too, whatever --intercept adds.
    """
    from elbasy.config import Config
    from elbasy.server import intercepted_hosts

    config = _settings() or Config()
    asked = tuple(dict.fromkeys([*intercept, *config.intercept]))
    every = intercepted_hosts(config, config.ruleset())
    return asked, tuple(dict.fromkeys([*asked, *every]))


def _wrapped(first: str, items: list[str]) -> None:
    """``first`` then ``items`` comma-separated, in lines of at most 100 columns."""
    import textwrap

    text = textwrap.fill(
        ", ".join(items),
        100,
        initial_indent=first,
        subsequent_indent=" " * 13 if first.strip().endswith(":") else "    ",
        break_long_words=False,
        break_on_hyphens=False,
    )
    click.echo(text)


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
    for label, value in rows:
        click.echo(f"{label + ':' if label else '':<13}{value}")
    _wrapped(f"{'intercept:':<13}", list(authority.intercept) or ["(none recorded)"])
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
