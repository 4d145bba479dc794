"""elbasy.roots: which CA certificates the upstream context loads on a host."""

from __future__ import annotations

import os
from pathlib import Path

import certifi

from elbasy.roots import SYSTEM_BUNDLES, Trust, system_bundle, upstream_trust


def test_ssl_cert_file_and_dir_replace_the_probe(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_text("")
    env = {"SSL_CERT_FILE": str(bundle)}
    assert upstream_trust(env) == Trust(str(bundle), None, "SSL_CERT_FILE/SSL_CERT_DIR")
    env = {"SSL_CERT_DIR": str(tmp_path)}
    assert upstream_trust(env) == Trust(None, str(tmp_path), "SSL_CERT_FILE/SSL_CERT_DIR")
    # an empty variable is unset, as for OpenSSL
    assert upstream_trust({"SSL_CERT_FILE": ""}).source != "SSL_CERT_FILE/SSL_CERT_DIR"


def test_the_first_existing_bundle_and_a_hashed_directory_win(tmp_path: Path) -> None:
    second = tmp_path / "second.pem"
    second.write_text("")
    third = tmp_path / "third.pem"
    third.write_text("")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "README").write_text("")
    hashed = tmp_path / "hashed"
    hashed.mkdir()
    (hashed / "9d8a9a7d.0").symlink_to(second)
    bundles = [str(tmp_path / "missing.pem"), str(second), str(third)]
    # a directory without <hash>.0 links is passed over
    trust = upstream_trust({}, bundles, [str(tmp_path / "nodir"), str(plain), str(hashed)])
    assert trust == Trust(str(second), str(hashed), "system")
    assert trust.describe() == f"system: {second}, {hashed}"
    assert upstream_trust({}, bundles, [str(plain)]) == Trust(str(second), None, "system")


def test_certifi_when_the_system_has_no_bundle(tmp_path: Path) -> None:
    trust = upstream_trust({}, [str(tmp_path / "none.pem")], [str(tmp_path)])
    assert trust == Trust(certifi.where(), None, "certifi")
    assert os.path.isfile(certifi.where())


def test_this_hosts_bundle_is_one_of_the_known_paths() -> None:
    found = system_bundle()
    assert found is None or found in SYSTEM_BUNDLES
    if found is not None:
        assert upstream_trust({}).cafile == found
