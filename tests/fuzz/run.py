"""Run one fuzz target under atheris: ``python tests/fuzz/run.py TARGET [libFuzzer flags]``.

TARGET is one of ``heads``, ``chunked``, ``connect_target``, ``hostglob``
(``tests/fuzz/fuzz_targets.py``). The flags are libFuzzer's: ``-runs=N``,
``-max_total_time=S``, a corpus directory to grow, ``-dict=``... With no
corpus directory given, the target's seeds are written to a fresh one first.
See tests/fuzz/README.md.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["elbasy", "test_framing", "fuzz_targets"]):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fuzz_targets


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in fuzz_targets.TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(fuzz_targets.TARGETS)}}} [libFuzzer flags]")
    name = sys.argv[1]
    target = fuzz_targets.TARGETS[name]
    args = [sys.argv[0], *sys.argv[2:]]
    if not any(not a.startswith("-") for a in args[1:]):
        corpus = Path(tempfile.mkdtemp(prefix=f"elbasy-fuzz-{name}-"))
        for i, seed in enumerate(fuzz_targets.SEEDS[name]):
            (corpus / f"seed-{i}").write_bytes(seed)
        args.append(str(corpus))
    atheris.Setup(args, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
