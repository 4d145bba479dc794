"""A short coverage-guided fuzz run of each target (atheris), bounded for the suite.

Each target (tests/fuzz/fuzz_targets.py) runs under libFuzzer in a process of
its own (``tests/fuzz/run.py``: atheris ends its process when it is done) for
at most RUNS inputs or SECONDS seconds, from its seeds; a finding (a
property that fails, or any exception but the parser's refusal) fails the
test with the input that caused it. Every seed is also run in this process,
so a target's properties are checked where atheris is not installed.
A longer run: tests/fuzz/README.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fuzz_targets import SEEDS, TARGETS

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RUNS = 20000
SECONDS = 5  # per target: 5 targets, at most ~30 s in all


@pytest.mark.parametrize("name", list(TARGETS))
def test_seeds_hold_the_properties(name: str) -> None:
    for seed in SEEDS[name]:
        TARGETS[name](seed)


@pytest.mark.parametrize("name", list(TARGETS))
def test_a_short_fuzz_run(name: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris is in the test extras (pip install atheris)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE.parent)])}
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE / "run.py"),
            name,
            f"-runs={RUNS}",
            f"-max_total_time={SECONDS}",
            f"-artifact_prefix={tmp_path}/",
            "-print_final_stats=1",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=SECONDS * 4 + 30,
    )
    tail = proc.stderr[-4000:]
    found = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "leak-")))
    assert proc.returncode == 0 and not found, f"{name}: {found}\n{tail}"
    assert "Done" in proc.stderr, tail  # the run itself ran
