"""elbasy.ca and `elbasy ca ...`: the interception CA, its name constraints and its leaves.

Real keys and signatures; `openssl verify` is the judge of chains and name
constraints, at a fixed instant (`-attime`) so that the injected clock and
OpenSSL's agree. No network, no sleeping.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import Proxy
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from elbasy.ca import (
    CA_LIFETIME,
    LEAF_LIFETIME,
    CAError,
    CertificateAuthority,
    Constraints,
    Leaf,
    constraints_for,
    default_data_dir,
    subtree_for_glob,
)
from elbasy.cli import main
from elbasy.config import Config, build_config
from elbasy.server import intercepted_hosts, prepare_ca

NOW = dt.datetime(2030, 1, 15, 12, 0, tzinfo=dt.UTC)
SHOPS = ("*.myshopify.com", "api.etsy.com", "127.0.0.1", "::1")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("ELBASY_"):
            monkeypatch.delenv(name)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "elbasy"


@pytest.fixture
def authority(data_dir: Path) -> CertificateAuthority:
    return CertificateAuthority.create(data_dir, SHOPS, now=NOW, hostname="testhost")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def first_cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificates(pem)[0]


def openssl_verify(ca_pem: Path, cert: x509.Certificate | bytes, tmp: Path, *extra: str) -> str:
    """Run `openssl verify -x509_strict` at NOW; return its output, "OK" meaning it passed."""
    pem = cert if isinstance(cert, bytes) else cert.public_bytes(serialization.Encoding.PEM)
    path = tmp / "leaf-under-test.pem"
    path.write_bytes(pem)
    proc = subprocess.run(
        [
            "openssl",
            "verify",
            "-x509_strict",
            "-purpose",
            "sslserver",
            "-attime",
            str(int(NOW.timestamp())),
            "-CAfile",
            str(ca_pem),
            *extra,
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    out = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == out.strip().endswith(": OK"), out
    return "OK" if proc.returncode == 0 else out


def sign_directly(
    authority: CertificateAuthority, san: x509.GeneralName, data_dir: Path
) -> x509.Certificate:
    """A leaf made by the test with the CA's key from disk, bypassing leaf_for's own checks."""
    key = serialization.load_pem_private_key((data_dir / "ca-key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    ski = authority.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test")]))
        .issuer_name(authority.cert.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(hours=1))
        .not_valid_after(NOW + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )


def sans(leaf: Leaf) -> list[x509.GeneralName]:
    cert = first_cert(leaf.cert_chain_pem)
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


# --------------------------------------------------------------------------- the CA itself


def test_create_writes_a_private_key_and_a_constrained_ca(
    authority: CertificateAuthority, data_dir: Path
) -> None:
    assert mode(data_dir) == 0o700
    assert mode(data_dir / "ca-key.pem") == 0o600
    assert not list(data_dir.glob(".*.tmp"))  # atomic writes leave nothing behind

    cert = x509.load_pem_x509_certificate((data_dir / "ca.pem").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "elbasy local CA on testhost"
    )
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "elbasy"
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)  # self-signed
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    assert cert.not_valid_before_utc == NOW - dt.timedelta(hours=1)
    assert cert.not_valid_after_utc == cert.not_valid_before_utc + CA_LIFETIME

    ext = cert.extensions
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key)
    nc = ext.get_extension_for_class(x509.NameConstraints)
    assert nc.critical
    assert set(nc.value.permitted_subtrees or ()) == {
        x509.DNSName("myshopify.com"),
        x509.DNSName("api.etsy.com"),
        x509.IPAddress(ipaddress.ip_network("127.0.0.1/32")),
        x509.IPAddress(ipaddress.ip_network("::1/128")),
    }
    assert nc.value.excluded_subtrees is None

    meta = json.loads((data_dir / "ca.json").read_text())
    assert meta["intercept"] == list(SHOPS) and meta["unconstrained"] is False


def test_reload_gives_the_same_ca(authority: CertificateAuthority, data_dir: Path) -> None:
    again = CertificateAuthority.load(data_dir)
    assert again.fingerprint() == authority.fingerprint()
    assert again.constraints == authority.constraints
    assert again.intercept == SHOPS
    assert again.subject.startswith("CN=elbasy local CA on testhost, O=elbasy, OU=created 2030")
    # the fingerprint is what `openssl x509 -fingerprint -sha256` prints
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(data_dir / "ca.pem")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip().endswith("=" + authority.fingerprint())


def test_create_refuses_to_replace_without_force(
    authority: CertificateAuthority, data_dir: Path
) -> None:
    authority.leaf_for("shop1.myshopify.com", NOW)
    with pytest.raises(CAError, match="already exists.*--force"):
        CertificateAuthority.create(data_dir, SHOPS, now=NOW)
    new = CertificateAuthority.create(data_dir, SHOPS, now=NOW, force=True)
    assert new.fingerprint() != authority.fingerprint()
    assert not list((data_dir / "leaves").iterdir())  # the old CA's leaves are gone
    assert CertificateAuthority.load(data_dir).fingerprint() == new.fingerprint()


def test_unconstrained_ca_warns_and_has_no_constraints(
    data_dir: Path, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    with caplog.at_level(logging.WARNING, logger="elbasy.ca"):
        authority = CertificateAuthority.create(data_dir, (), now=NOW, unconstrained=True)
    assert "UNCONSTRAINED" in caplog.text
    assert authority.unconstrained and authority.constraints is None
    with pytest.raises(x509.ExtensionNotFound):
        authority.cert.extensions.get_extension_for_class(x509.NameConstraints)
    leaf = authority.leaf_for("example.org", NOW)
    assert openssl_verify(authority.cert_path, leaf.cert_chain_pem, tmp_path) == "OK"
    assert authority.needs_new_ca(["*.anything.example"]) is None


def test_load_without_a_ca_says_what_to_run(data_dir: Path) -> None:
    with pytest.raises(CAError, match="no CA in .*elbasy ca init"):
        CertificateAuthority.load(data_dir)


@pytest.mark.parametrize("bad_mode", [0o644, 0o640, 0o604])
def test_a_key_others_can_read_is_refused(
    authority: CertificateAuthority, data_dir: Path, bad_mode: int
) -> None:
    key = data_dir / "ca-key.pem"
    os.chmod(key, bad_mode)
    with pytest.raises(CAError, match=f"mode {bad_mode:04o}.*chmod 600 {key}"):
        CertificateAuthority.load(data_dir)
    os.chmod(key, 0o600)
    CertificateAuthority.load(data_dir)


def test_a_data_dir_others_can_write_is_refused(
    authority: CertificateAuthority, data_dir: Path
) -> None:
    os.chmod(data_dir, 0o777)
    with pytest.raises(CAError, match=f"chmod 700 {data_dir}"):
        CertificateAuthority.load(data_dir)


def test_damaged_files_are_reported(authority: CertificateAuthority, data_dir: Path) -> None:
    key = data_dir / "ca-key.pem"
    good = key.read_bytes()
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    with pytest.raises(CAError, match="ca-key.pem is damaged.*elbasy ca init --force"):
        CertificateAuthority.load(data_dir)

    other = ec.generate_private_key(ec.SECP256R1())
    key.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(CAError, match="does not belong to"):
        CertificateAuthority.load(data_dir)

    key.write_bytes(good)
    (data_dir / "ca.pem").write_bytes(b"garbage")
    with pytest.raises(CAError, match="ca.pem is damaged"):
        CertificateAuthority.load(data_dir)


def test_default_data_dir() -> None:
    assert default_data_dir({"XDG_DATA_HOME": "/x/data", "HOME": "/h"}) == Path("/x/data/elbasy")
    assert default_data_dir({"XDG_DATA_HOME": "rel", "HOME": "/h"}) == Path(
        "/h/.local/share/elbasy"
    )
    assert default_data_dir({"HOME": "/h"}) == Path("/h/.local/share/elbasy")


# --------------------------------------------------------------------------- name constraints


@pytest.mark.parametrize(
    ("glob", "subtree"),
    [
        ("api.etsy.com", "api.etsy.com"),
        ("API.Etsy.com.", "api.etsy.com"),
        ("*.myshopify.com", "myshopify.com"),
        ("api*.example.com", "example.com"),
        ("shop-?.myshopify.com", "myshopify.com"),
        ("a.*.example.com", "example.com"),
        ("localhost", "localhost"),
        ("127.0.0.1", ipaddress.ip_network("127.0.0.1/32")),
        ("[::1]", ipaddress.ip_network("::1/128")),
    ],
)
def test_subtree_for_glob(glob: str, subtree: object) -> None:
    assert subtree_for_glob(glob) == subtree


@pytest.mark.parametrize(
    ("glob", "message"),
    [
        ("*", "cannot be expressed.*every host name.*--unconstrained-ca"),
        ("example.*", "cannot be expressed"),
        ("*.com", r"cannot be expressed.*every name under \.com"),
        ("10.0.*.1", "IP address globs"),
        ("exa mple.com", "not a host name"),
    ],
)
def test_globs_without_a_subtree(glob: str, message: str) -> None:
    with pytest.raises(CAError, match=message):
        subtree_for_glob(glob)


def test_constraints_for_drops_nested_subtrees_and_excludes_ips() -> None:
    c = constraints_for(["api.etsy.com", "etsy.com", "*.myshopify.com", "x.myshopify.com"])
    assert c.dns == ("etsy.com", "myshopify.com")
    assert c.ips == ()
    assert {str(n) for n in c.excluded_ips} == {"0.0.0.0/0", "::/0"}
    with pytest.raises(CAError, match="at least one --intercept"):
        constraints_for([])


@pytest.mark.parametrize(
    "name",
    [
        "shop9.myshopify.com",
        "*.myshopify.com",
        "a.b.myshopify.com",
        "myshopify.com",
        "api.etsy.com",
    ],
)
def test_names_inside_the_constraints_verify(
    authority: CertificateAuthority, data_dir: Path, tmp_path: Path, name: str
) -> None:
    cert = sign_directly(authority, x509.DNSName(name), data_dir)
    assert openssl_verify(authority.cert_path, cert, tmp_path) == "OK"


@pytest.mark.parametrize(
    "san",
    [
        x509.DNSName("evil.example.com"),
        x509.DNSName("notmyshopify.com"),
        x509.DNSName("myshopify.com.evil.net"),
        x509.DNSName("www.etsy.com"),
        x509.DNSName("*.com"),
        x509.IPAddress(ipaddress.ip_address("8.8.8.8")),
        x509.IPAddress(ipaddress.ip_address("::2")),
    ],
    ids=lambda san: str(san.value),
)
def test_names_outside_the_constraints_fail_verification(
    authority: CertificateAuthority, data_dir: Path, tmp_path: Path, san: x509.GeneralName
) -> None:
    cert = sign_directly(authority, san, data_dir)
    cert.verify_directly_issued_by(authority.cert)  # the signature itself is fine
    out = openssl_verify(authority.cert_path, cert, tmp_path)
    assert "permitted subtree violation" in out or "excluded subtree violation" in out, out
    # and the CA will not mint it either
    with pytest.raises(CAError, match="outside the CA's name constraints|not a valid host"):
        authority.leaf_for(str(san.value), NOW)


def test_ip_addresses_are_excluded_when_no_ip_is_intercepted(
    data_dir: Path, tmp_path: Path
) -> None:
    authority = CertificateAuthority.create(data_dir, ["*.myshopify.com"], now=NOW)
    for ip in ("127.0.0.1", "::1", "10.1.2.3"):
        cert = sign_directly(authority, x509.IPAddress(ipaddress.ip_address(ip)), data_dir)
        assert "excluded subtree violation" in openssl_verify(authority.cert_path, cert, tmp_path)


def test_needs_new_ca(authority: CertificateAuthority) -> None:
    assert authority.needs_new_ca(SHOPS) is None
    assert authority.needs_new_ca(["shop*.myshopify.com", "x.api.etsy.com", "[::1]"]) is None
    message = authority.needs_new_ca(["*.myshopify.com", "*.etsy.com", "10.0.0.1"])
    assert message is not None
    assert "'*.etsy.com', '10.0.0.1'" in message
    assert "'*.myshopify.com'," not in message.split("issue")[1].split("Make")[0]
    assert "elbasy ca init --force --data-dir" in message
    assert "--intercept '*.etsy.com'" in message
    assert "trust-help" in message
    assert "cannot be expressed" in (authority.needs_new_ca(["*"]) or "")
    # nearing its expiry: rotate
    assert authority.needs_new_ca(SHOPS, now=NOW) is None
    late = authority.not_after - dt.timedelta(days=100)
    assert "expires on" in (authority.needs_new_ca(SHOPS, now=late) or "")


def test_constraints_round_trip() -> None:
    c = constraints_for(["*.myshopify.com", "127.0.0.1"])
    assert Constraints.from_extension(c.extension()) == c


# --------------------------------------------------------------------------- leaves


def test_leaf_chains_to_the_ca(
    authority: CertificateAuthority, data_dir: Path, tmp_path: Path
) -> None:
    leaf = authority.leaf_for("shop1.myshopify.com", NOW)
    certs = x509.load_pem_x509_certificates(leaf.cert_chain_pem)
    assert len(certs) == 2 and certs[1] == authority.cert
    cert = certs[0]
    cert.verify_directly_issued_by(authority.cert)
    assert (
        openssl_verify(
            authority.cert_path, cert, tmp_path, "-verify_hostname", "shop1.myshopify.com"
        )
        == "OK"
    )
    # the chain file as an SSL_CTX would load it, untrusted part included
    assert openssl_verify(authority.cert_path, leaf.cert_chain_pem, tmp_path) == "OK"

    key = serialization.load_pem_private_key(leaf.key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert key.public_key() == cert.public_key()
    assert leaf.not_after == cert.not_valid_after_utc == NOW - dt.timedelta(hours=1) + LEAF_LIFETIME
    assert leaf.serial == cert.serial_number

    ext = cert.extensions
    assert not ext.get_extension_for_class(x509.BasicConstraints).value.ca
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = authority.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert ext.get_extension_for_class(x509.SubjectKeyIdentifier).value == (
        x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    )

    on_disk = data_dir / "leaves" / "*.myshopify.com.pem"
    assert mode(on_disk) == 0o600
    assert on_disk.read_bytes() == certs[0].public_bytes(serialization.Encoding.PEM) + leaf.key_pem


def test_wildcard_leaf_serves_every_shop(authority: CertificateAuthority, tmp_path: Path) -> None:
    one = authority.leaf_for("shop1.myshopify.com", NOW)
    two = authority.leaf_for("SHOP2.myshopify.com.", NOW)
    assert one is two and one.serial == two.serial
    assert authority.minted == 1
    assert one.name == "*.myshopify.com"
    assert sans(one) == [x509.DNSName("*.myshopify.com")]
    for host in ("shop1.myshopify.com", "shop2.myshopify.com"):
        out = openssl_verify(
            authority.cert_path, one.cert_chain_pem, tmp_path, "-verify_hostname", host
        )
        assert out == "OK"
    # a wildcard covers one label only: deeper names and the bare domain get their own
    deep = authority.leaf_for("a.b.myshopify.com", NOW)
    bare = authority.leaf_for("myshopify.com", NOW)
    assert sans(deep) == [x509.DNSName("a.b.myshopify.com")]
    assert sans(bare) == [x509.DNSName("myshopify.com")]
    assert authority.minted == 3


def test_bare_name_gets_its_own_san(authority: CertificateAuthority, tmp_path: Path) -> None:
    leaf = authority.leaf_for("api.etsy.com", NOW)
    assert leaf.name == "api.etsy.com"
    assert sans(leaf) == [x509.DNSName("api.etsy.com")]
    out = openssl_verify(
        authority.cert_path, leaf.cert_chain_pem, tmp_path, "-verify_hostname", "api.etsy.com"
    )
    assert out == "OK"


def test_globs_other_than_star_dot_get_exact_leaves(data_dir: Path) -> None:
    authority = CertificateAuthority.create(data_dir, ["api*.example.com"], now=NOW)
    assert authority.leaf_for("api2.example.com", NOW).name == "api2.example.com"
    # a glob given at load time decides the wildcard, within the CA's constraints
    wide = CertificateAuthority.load(data_dir, intercept=["*.example.com"])
    assert wide.leaf_for("api3.example.com", NOW).name == "*.example.com"
    narrow = CertificateAuthority.create(data_dir, ["shop1.myshopify.com"], now=NOW, force=True)
    narrow = CertificateAuthority.load(data_dir, intercept=["*.myshopify.com"])
    # *.myshopify.com would break the constraint shop1.myshopify.com: the name alone
    assert narrow.leaf_for("shop1.myshopify.com", NOW).name == "shop1.myshopify.com"


@pytest.mark.parametrize(("name", "ip"), [("127.0.0.1", "127.0.0.1"), ("[::1]", "::1")])
def test_ip_literal_leaf(
    authority: CertificateAuthority, tmp_path: Path, name: str, ip: str
) -> None:
    leaf = authority.leaf_for(name, NOW)
    assert leaf.name == ip
    assert sans(leaf) == [x509.IPAddress(ipaddress.ip_address(ip))]
    out = openssl_verify(authority.cert_path, leaf.cert_chain_pem, tmp_path, "-verify_ip", ip)
    assert out == "OK"


@pytest.mark.parametrize("name", ["", "../../etc/passwd", "a..b", "-x.com", "a/b.myshopify.com"])
def test_names_that_are_not_host_names_are_refused(
    authority: CertificateAuthority, name: str
) -> None:
    with pytest.raises(CAError, match="not a valid host name"):
        authority.leaf_for(name, NOW)


def test_renewal_when_a_third_is_left(authority: CertificateAuthority, data_dir: Path) -> None:
    first = authority.leaf_for("shop1.myshopify.com", NOW)
    assert first.renew_at() == first.not_after - LEAF_LIFETIME / 3
    just_before = first.renew_at() - dt.timedelta(seconds=1)
    assert authority.leaf_for("shop1.myshopify.com", just_before) is first
    from_disk = CertificateAuthority.load(data_dir).leaf_for("shop2.myshopify.com", just_before)
    assert from_disk.serial == first.serial
    second = authority.leaf_for("shop1.myshopify.com", first.renew_at())
    assert second.serial != first.serial
    assert second.not_after == first.renew_at() - dt.timedelta(hours=1) + LEAF_LIFETIME
    assert authority.minted == 2
    # the renewed leaf replaced the old one on disk too
    again = CertificateAuthority.load(data_dir)
    assert again.leaf_for("shop3.myshopify.com", first.renew_at()).serial == second.serial
    assert again.minted == 0


def test_leaves_never_outlive_the_ca(authority: CertificateAuthority) -> None:
    late = authority.not_after - dt.timedelta(days=5)
    leaf = authority.leaf_for("api.etsy.com", late)
    assert leaf.not_after == authority.not_after
    with pytest.raises(CAError, match="expired"):
        authority.leaf_for("shop1.myshopify.com", authority.not_after)


def test_naive_now_is_refused(authority: CertificateAuthority) -> None:
    with pytest.raises(ValueError, match="aware"):
        authority.leaf_for("api.etsy.com", NOW.replace(tzinfo=None))


def test_lru_eviction(data_dir: Path) -> None:
    authority = CertificateAuthority.create(data_dir, ["example.com"], now=NOW, cache_size=2)
    a = authority.leaf_for("a.example.com", NOW)
    authority.leaf_for("b.example.com", NOW)
    authority.leaf_for("c.example.com", NOW)
    assert authority.cached_names() == ["b.example.com", "c.example.com"]
    authority.leaf_for("b.example.com", NOW)  # b is now the most recent
    authority.leaf_for("d.example.com", NOW)
    assert authority.cached_names() == ["b.example.com", "d.example.com"]
    assert authority.minted == 4
    # the evicted leaf comes back from disk, not minted again
    a_again = authority.leaf_for("a.example.com", NOW)
    assert a_again is not a and a_again.serial == a.serial
    assert a_again.cert_chain_pem == a.cert_chain_pem and a_again.key_pem == a.key_pem
    assert authority.minted == 4
    assert authority.cached_names() == ["d.example.com", "a.example.com"]


def test_disk_cache_is_shared_across_instances(
    authority: CertificateAuthority, data_dir: Path
) -> None:
    leaf = authority.leaf_for("shop1.myshopify.com", NOW)
    ip_leaf = authority.leaf_for("::1", NOW)
    other = CertificateAuthority.load(data_dir)
    assert other.leaf_for("shop7.myshopify.com", NOW).serial == leaf.serial
    assert other.leaf_for("::1", NOW).serial == ip_leaf.serial
    assert other.minted == 0


def test_unusable_leaf_files_are_minted_again(
    authority: CertificateAuthority, data_dir: Path, tmp_path: Path
) -> None:
    serial = authority.leaf_for("api.etsy.com", NOW).serial
    path = data_dir / "leaves" / "api.etsy.com.pem"

    path.write_bytes(b"garbage")
    fresh = CertificateAuthority.load(data_dir)
    replaced = fresh.leaf_for("api.etsy.com", NOW)
    assert fresh.minted == 1 and replaced.serial != serial
    assert mode(path) == 0o600 and path.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")

    # a leaf issued by another CA (e.g. before `init --force`) is not served
    stranger = CertificateAuthority.create(tmp_path / "other", SHOPS, now=NOW)
    stranger.leaf_for("api.etsy.com", NOW)
    path.write_bytes((tmp_path / "other" / "leaves" / "api.etsy.com.pem").read_bytes())
    os.chmod(path, 0o600)
    fresh = CertificateAuthority.load(data_dir)
    leaf = fresh.leaf_for("api.etsy.com", NOW)
    assert fresh.minted == 1
    first_cert(leaf.cert_chain_pem).verify_directly_issued_by(authority.cert)

    # and one other users could read is replaced too
    os.chmod(path, 0o644)
    fresh = CertificateAuthority.load(data_dir)
    fresh.leaf_for("api.etsy.com", NOW)
    assert fresh.minted == 1 and mode(path) == 0o600


# --------------------------------------------------------------------------- the CLI


def ca_cli(*args: str) -> Result:
    return CliRunner().invoke(main, ["ca", *args], prog_name="elbasy")


def test_cli_init_show_export(data_dir: Path) -> None:
    d = str(data_dir)
    result = ca_cli(
        "init", "--data-dir", d, "--intercept", "*.myshopify.com", "--intercept", "api*.etsy.com"
    )
    assert result.exit_code == 0, result.output
    assert f"Created a CA in {d}" in result.stdout
    assert "'*.myshopify.com': permits myshopify.com and every name under it" in result.stdout
    assert "'api*.etsy.com': not expressible" in result.stdout
    assert "nearest parent etsy.com" in result.stdout
    assert mode(data_dir / "ca-key.pem") == 0o600
    authority = CertificateAuthority.load(data_dir)

    result = ca_cli("show", "--data-dir", d)
    assert result.exit_code == 0, result.output
    assert "subject:     CN=elbasy local CA on " in result.stdout
    assert authority.fingerprint() in result.stdout
    assert "permitted DNS: myshopify.com" in result.stdout
    assert "permitted DNS: etsy.com" in result.stdout
    assert "excluded IP: 0.0.0.0/0, ::/0" in result.stdout
    assert f"not after:   {authority.not_after:%Y-%m-%d}" in result.stdout

    result = ca_cli("export", "--data-dir", d)
    assert result.exit_code == 0
    assert result.stdout.encode() == (data_dir / "ca.pem").read_bytes()


def test_cli_init_again(data_dir: Path) -> None:
    d = str(data_dir)
    assert ca_cli("init", "--data-dir", d, "--intercept", "*.myshopify.com").exit_code == 0
    fingerprint = CertificateAuthority.load(data_dir).fingerprint()

    covered = ca_cli("init", "--data-dir", d, "--intercept", "shop1.myshopify.com")
    assert covered.exit_code == 0 and "nothing to do" in covered.stdout

    wider = ca_cli("init", "--data-dir", d, "--intercept", "*.etsy.com")
    assert wider.exit_code == 1
    said = " ".join(wider.stderr.split())
    assert "cannot issue certificates for '*.etsy.com'" in said
    # a few lines of at most 100 columns; the command on its own, naming the user's glob
    assert all(len(line) <= 100 for line in wider.stderr.splitlines()[:-1]), wider.stderr
    assert wider.stderr.splitlines()[-1] == (
        f"  elbasy ca init --force --data-dir {d} --intercept '*.etsy.com'"
    )
    assert CertificateAuthority.load(data_dir).fingerprint() == fingerprint

    forced = ca_cli("init", "--data-dir", d, "--intercept", "*.etsy.com", "--force")
    assert forced.exit_code == 0, forced.output
    assert CertificateAuthority.load(data_dir).fingerprint() != fingerprint


def test_cli_init_needs_intercept_or_unconstrained(data_dir: Path) -> None:
    # no rule enabled and no --intercept: nothing to constrain the CA to
    result = CliRunner().invoke(
        main, ["--rules", "", "ca", "init", "--data-dir", str(data_dir)], prog_name="elbasy"
    )
    assert result.exit_code == 1
    assert "--intercept GLOB" in result.stderr and "--unconstrained-ca" in result.stderr
    result = ca_cli("init", "--data-dir", str(data_dir), "--intercept", "*")
    assert result.exit_code == 1 and "--unconstrained-ca" in result.stderr

    result = ca_cli("init", "--data-dir", str(data_dir), "--unconstrained-ca")
    assert result.exit_code == 0, result.output
    assert "UNCONSTRAINED" in result.stderr
    assert "NONE: this CA can issue for any host" in result.stdout


def test_cli_reads_the_environment(data_dir: Path, tmp_path: Path) -> None:
    env = {"ELBASY_DATA_DIR": str(data_dir), "ELBASY_INTERCEPT": "*.myshopify.com api.etsy.com"}
    result = CliRunner().invoke(main, ["ca", "init"], env=env, prog_name="elbasy")
    assert result.exit_code == 0, result.output
    # the globs asked for first, then the enabled rules' hosts
    got = CertificateAuthority.load(data_dir).intercept
    assert got == ("*.myshopify.com", "api.etsy.com", *rules_hosts(got[:2]))
    # and the XDG default
    xdg = tmp_path / "xdg"
    result = CliRunner().invoke(
        main,
        ["ca", "init", "--intercept", "api.etsy.com"],
        env={"XDG_DATA_HOME": str(xdg)},
        prog_name="elbasy",
    )
    assert result.exit_code == 0, result.output
    assert (xdg / "elbasy" / "ca-key.pem").exists()


def rules_hosts(before: tuple[str, ...] = ()) -> list[str]:
    """The hosts of the rules enabled by default, those in ``before`` left out."""
    globs = intercepted_hosts(Config(), Config().ruleset())
    return [g for g in globs if g not in before]


def test_cli_init_defaults_to_the_enabled_rules_hosts(data_dir: Path) -> None:
    result = ca_cli("init", "--data-dir", str(data_dir))
    assert result.exit_code == 0, result.output
    hosts = rules_hosts()
    assert len(hosts) >= 6 and "openapi.etsy.com" in hosts
    assert CertificateAuthority.load(data_dir).intercept == tuple(hosts)
    assert all(len(line) <= 100 for line in result.stdout.splitlines() if "SHA-256" not in line)
    # the CA plain `elbasy` makes on its first run is the same one: it starts with it
    prepare_ca(build_config(data_dir=str(data_dir)))
    # a subset of the rules: only their hosts
    only = data_dir.parent / "only-etsy"
    result = CliRunner().invoke(
        main, ["--rules", "etsy-v3", "ca", "init", "--data-dir", str(only)], prog_name="elbasy"
    )
    assert result.exit_code == 0, result.output
    assert CertificateAuthority.load(only).intercept == ("openapi.etsy.com",)


def test_cli_init_as_the_readme_shows_makes_a_ca_elbasy_starts_with(
    data_dir: Path, proxy: Callable[..., Proxy]
) -> None:
    d = str(data_dir)
    result = ca_cli(
        "init", "--data-dir", d, "--intercept", "*.myshopify.com", "--intercept", "api.etsy.com"
    )
    assert result.exit_code == 0, result.output
    assert "'api.etsy.com': permits api.etsy.com" in result.stdout
    said = " ".join(result.stdout.split())
    assert "the enabled rules' hosts, which elbasy intercepts too: openapi.etsy.com," in said
    authority = CertificateAuthority.load(data_dir)
    assert authority.intercept[:2] == ("*.myshopify.com", "api.etsy.com")
    # plain `elbasy` with the same data dir: every host it intercepts is covered
    config = build_config(data_dir=d)
    assert authority.needs_new_ca(intercepted_hosts(config, config.ruleset())) is None
    prepare_ca(config)
    # and `elbasy --intercept api.etsy.com` too
    prepare_ca(build_config(data_dir=d, intercept=("api.etsy.com",)))
    # a real start: it listens, no refusal
    p = proxy("--data-dir", d)
    assert "name-constrained" not in p.stderr


def test_cli_trust_help_prints_real_paths(data_dir: Path) -> None:
    d = str(data_dir)
    assert ca_cli("init", "--data-dir", d, "--intercept", "*.myshopify.com").exit_code == 0
    result = ca_cli("trust-help", "--data-dir", d)
    assert result.exit_code == 0, result.output
    out = result.stdout
    cert = data_dir / "ca.pem"
    bundle = data_dir / "bundle.pem"
    assert f"sudo cp {cert} /usr/local/share/ca-certificates/elbasy-ca.crt" in out
    assert "sudo update-ca-certificates" in out
    assert f"sudo cp {cert} /etc/pki/ca-trust/source/anchors/elbasy-ca.pem" in out
    assert "sudo update-ca-trust" in out
    assert f"{cert} > {bundle}" in out
    assert f"export SSL_CERT_FILE={bundle}" in out
    assert f"export REQUESTS_CA_BUNDLE={bundle}" in out
    assert f"export NODE_EXTRA_CA_CERTS={cert}" in out
    assert f"curl --cacert {bundle}" in out
    assert CertificateAuthority.load(data_dir).fingerprint() in out


def test_cli_without_a_ca(data_dir: Path) -> None:
    for command in ("show", "export", "trust-help"):
        result = ca_cli(command, "--data-dir", str(data_dir))
        assert result.exit_code == 1, command
        assert "no CA in" in result.stderr and "elbasy ca init" in result.stderr


def test_cli_ca_help_does_not_start_the_proxy() -> None:
    result = ca_cli("--help")
    assert result.exit_code == 0
    for command in ("init", "show", "export", "trust-help"):
        assert command in result.stdout
    assert "ca" in CliRunner().invoke(main, ["--help"]).stdout


def test_a_name_longer_than_a_common_name(authority: CertificateAuthority, tmp_path: Path) -> None:
    data_dir = authority.data_dir
    name = "a" * 60 + ".b.myshopify.com"
    leaf = authority.leaf_for(name, NOW)
    cert = first_cert(leaf.cert_chain_pem)
    assert not cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert sans(leaf) == [x509.DNSName(name)]
    out = openssl_verify(authority.cert_path, cert, tmp_path, "-verify_hostname", name)
    assert out == "OK"
    assert (data_dir / "leaves" / (name + ".pem")).exists()
