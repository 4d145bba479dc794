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


def test_cython_lint() -> None:
    run(sys.executable, "-m", "cython_lint.cython_lint", "ext/loop.pyx", "ext/heads.pyx")
