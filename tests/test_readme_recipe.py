"""The README's recipe, run as written: its shell and Python blocks, in order, in one bash session.

README.md marks the recipe with ``<!-- recipe:start -->`` and ``<!-- recipe:end -->``; every
fenced ``sh`` block between them is a step of one bash script (``set -e``: a failing command
fails the test), and every ``python`` block follows a ``<!-- recipe:file NAME -->`` line and is
saved as NAME in the session's directory, where the steps after it run it.

What a test machine must have differently is given from outside, never by editing the commands:

* the upstreams: the mocks of Shopify, Etsy and GitHub (tests/mockapis) on loopback ports,
  reached under the real host names through ``ELBASY_CONNECT_TO`` and trusted through
  ``ELBASY_UPSTREAM_CA`` (every option is also an ``ELBASY_*`` variable);
* a free port instead of 8080: ``ELBASY_LISTEN``, and ``127.0.0.1:8080`` in the commands replaced
  by that address (the one textual substitution);
* a data dir of its own (``XDG_DATA_HOME``), so the CA made is never the user's;
* ``elbasy`` and ``python3`` on ``PATH`` as this checkout's elbasy and this interpreter.

Then the pacing must show: every call answered 200, none refused by a mock, more calls accepted
than the shop's bucket holds, and access lines that waited.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import origins
import pytest
from conftest import PROXY_ENV_VARS, REPO
from mockapis.remote import RemoteMock

README = REPO / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)
FILE_MARK = re.compile(r"<!-- recipe:file (\S+) -->\s*\Z")
BUCKET = 40  # a Standard shop's REST bucket (the mock's default plan, elbasy's default tier)


def recipe_steps(text: str) -> tuple[list[str], dict[str, str]]:
    """The recipe's shell steps in order, and its files by name."""
    start, end = "<!-- recipe:start -->", "<!-- recipe:end -->"
    assert text.count(start) == 1 and text.count(end) == 1, "README.md: one marked recipe"
    body = text[text.index(start) + len(start) : text.index(end)]
    steps: list[str] = []
    files: dict[str, str] = {}
    last = 0
    for m in FENCE.finditer(body):
        lang, code = m.group(1), m.group(2)
        mark = FILE_MARK.search(body[last : m.start()])
        if lang == "python":
            assert mark, f"a python block without <!-- recipe:file NAME -->:\n{code}"
            files[mark.group(1)] = code
        elif lang == "sh":
            assert not mark, "<!-- recipe:file --> must precede a python block"
            steps.append(code)
        else:
            raise AssertionError(f"a ```{lang} block in the recipe: only sh and python run")
        last = m.end()
    return steps, files


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def mocks(tmp_path: Path) -> Iterator[tuple[dict[str, RemoteMock], Path]]:
    """Shopify, Etsy and GitHub mocks in processes of their own, under one test CA."""
    ca = origins.make_ca(tmp_path)
    cert, key = origins.make_leaf(
        ca, tmp_path, names=("*.myshopify.com", "openapi.etsy.com", "api.github.com")
    )
    started: dict[str, RemoteMock] = {}
    try:
        for kind in ("shopify", "etsy", "github"):
            started[kind] = RemoteMock(kind, cert, key, ca.path)
        yield started, ca.path
    finally:
        for mock in started.values():
            mock.close()


def test_the_readme_recipe_paces_shopify_etsy_and_github_through_real_clients(
    tmp_path: Path, mocks: tuple[dict[str, RemoteMock], Path]
) -> None:
    assert importlib.util.find_spec("shopify"), "ShopifyAPI is missing: pip install -e '.[test]'"
    steps, files = recipe_steps(README.read_text())
    assert steps and files, "the recipe has no steps"
    apis, mock_ca = mocks
    port = free_port()
    address = f"127.0.0.1:{port}"

    session = tmp_path / "session"
    session.mkdir()
    for name, code in files.items():
        (session / name).write_text(code)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = shlex.quote(sys.executable)
    for name, command in (("elbasy", f"{python} -m elbasy"), ("python3", python)):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        (bin_dir / name).chmod(0o755)

    script = "\n".join(steps).replace("127.0.0.1:8080", address)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in PROXY_ENV_VARS and not k.startswith("ELBASY_")
    }
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
        XDG_DATA_HOME=str(tmp_path / "data"),
        ELBASY_LISTEN=address,
        ELBASY_UPSTREAM_CA=str(mock_ca),
        ELBASY_CONNECT_TO=" ".join(
            f"{host}:443:127.0.0.1:{apis[kind].port}"
            for host, kind in (
                ("*.myshopify.com", "shopify"),
                ("openapi.etsy.com", "etsy"),
                ("api.github.com", "github"),
            )
        ),
    )
    # the recipe ends by stopping elbasy; should it fail before, the trap stops it
    wrapped = f"set -e\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n{script}\nwait\n"
    proc = subprocess.Popen(
        ["bash", "-c", wrapped],
        cwd=session,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"the recipe did not finish in 120 s\n{out}\n{err}") from None
    log = (session / "elbasy.log").read_text() if (session / "elbasy.log").exists() else ""
    shown = f"stdout:\n{out}\nstderr:\n{err}\nelbasy.log:\n{log}"
    assert proc.returncode == 0, f"the recipe failed ({proc.returncode})\n{shown}"

    # the requests worker: 50 calls, every one 200, some of them held by elbasy
    calls = re.findall(r"^call +\d+: (\d+), waited ([\d.]+) s in elbasy$", out, re.M)
    assert len(calls) == 50, shown
    assert {status for status, _ in calls} == {"200"}, shown
    assert "429s: 0" in out, shown
    assert any(float(w) >= 0.2 for _, w in calls), shown
    # curl and ShopifyAPI, on the same account once the worker has filled its bucket
    curl = re.findall(r"^(\d{3}), call limit \d+/40, waited ([\d.]+) s$", out, re.M)
    assert len(curl) == 1 and curl[0][0] == "200", shown
    api = re.findall(r"^ShopifyAPI: (\d{3}), waited ([\d.]+) s$", out, re.M)
    assert len(api) == 3 and {s for s, _ in api} == {"200"}, shown
    assert any(float(w) > 0.1 for _, w in api), shown

    # the Shopify mock: nothing refused, more accepted than its bucket holds at once
    shop = apis["shopify"].stats()["totals"]
    assert shop["throttled"] == 0, shop
    assert shop["accepted"] > BUCKET + 10, shop
    # the access lines say who waited, under which rule and account
    waited = re.findall(
        r"elbasy\.access .* 200 .*wait_ms=([\d.]+) .*rule=shopify-admin-rest account=", log
    )
    assert len(waited) == shop["accepted"], shown
    assert sum(float(w) >= 100 for w in waited) >= 3, shown
    # the metrics step printed the quota wait of the Shopify rule and no upstream refusal
    assert re.search(r'^elbasy_quota_wait_seconds_count\{rule="shopify-admin-rest"\} \d', out, re.M)
    assert not re.search(r"^elbasy_upstream_throttled_total\{.*\} [1-9]", out, re.M), shown

    # Etsy: 15 calls at once against 10 a second: none refused, some held
    etsy = re.findall(r"^(\d{3}), waited ([\d.]+) s$", out, re.M)
    assert len(etsy) == 15 and {s for s, _ in etsy} == {"200"}, shown
    # fifteen curl processes start over a few hundred ms on a loaded machine while
    # the bucket refills at 10/s: some are held, perhaps for less than 0.1 s
    assert any(float(w) > 0 for _, w in etsy), shown
    assert apis["etsy"].stats()["totals"]["throttled"] == 0
    # GitHub: the GraphQL answer came back through elbasy, paced under the token's account
    assert '"viewer"' in out and '"rateLimit"' in out, shown
    assert re.search(r"rule=github-graphql account=github-graphql\|", log), shown
