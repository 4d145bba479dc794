"""ruff, mypy and cython-lint run as tests so they cannot be skipped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> None:
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff() -> None:
    run(sys.executable, "-m", "ruff", "check", "elbasy", "tests", "bench")


def test_mypy() -> None:
    run(sys.executable, "-m", "mypy")


#: every Cython file of ext/: the modules, the loop's rooms and declarations, the includes
CYTHON_SOURCES = sorted(
    str(p.relative_to(ROOT))
    for pattern in ("*.pyx", "loop/*.pyx", "loop/*.pxi", "loop/elbasy/*.pxd", "includes/*.px?")
    for p in (ROOT / "ext").glob(pattern)
)


def test_cython_lint() -> None:
    assert "ext/loop/loop.pyx" in CYTHON_SOURCES and "ext/includes/consts.pxi" in CYTHON_SOURCES
    run(sys.executable, "-m", "cython_lint.cython_lint", *CYTHON_SOURCES)
