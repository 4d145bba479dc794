"""The loop's state machine as written down: the state table at the top of
ext/loop/loop.pyx, the ConnState enum, both dispatches, and the constants the
loop shares with Python must all say the same thing."""

from __future__ import annotations

import re
from pathlib import Path

import elbasy._loop as loop_module
from elbasy import config, verdicts

ROOT = Path(__file__).resolve().parent.parent
EXT = ROOT / "ext"
LOOP = EXT / "loop"
COLUMNS = ("set by", "deadline", "expiry", "epoll", "events")


def enum_members(name: str) -> dict[str, int]:
    text = (EXT / "includes" / "consts.pxi").read_text()
    block = re.search(rf"^cdef enum {name}:\n((?:    .*\n|\n)+)", text, re.M)
    assert block, f"no cdef enum {name} in consts.pxi"
    return {m[1]: int(m[2]) for m in re.finditer(r"^    (\w+) = (-?\d+)", block[1], re.M)}


def state_table() -> dict[str, dict[str, str]]:
    """The rows of the module docstring's state table: state -> column -> text."""
    doc = loop_module.__doc__ or ""
    table = doc.split("State table\n-----------\n", 1)[1]
    rows: dict[str, dict[str, str]] = {}
    state = column = ""
    for line in table.splitlines():
        if re.match(r"^S_\w+$", line):
            state = line
            rows[state] = {}
            continue
        m = re.match(r"^    ([a-z ]+):\s+(.*)$", line)
        if state and m and m[1] in COLUMNS:
            column = m[1]
            rows[state][column] = m[2]
        elif state and column and line.startswith("          "):
            rows[state][column] += " " + line.strip()
    return rows


def function_bodies() -> dict[str, str]:
    """Every module-level cdef function of the loop's rooms: name -> source."""
    bodies: dict[str, str] = {}
    for path in sorted(LOOP.glob("*.pxi")):
        for chunk in re.split(r"^(?=cdef |@)", path.read_text(), flags=re.M):
            m = re.match(r"cdef (?!class |struct |enum )[^(\n]*?(\w+)\(", chunk)
            if m:
                bodies[m[1]] = chunk
    return bodies


def states_named(source: str) -> set[str]:
    return set(re.findall(r"\bst == (S_\w+)", source))


def test_enum_matches_the_module() -> None:
    assert enum_members("ConnState") == loop_module.STATES
    assert len(set(loop_module.STATES.values())) == len(loop_module.STATES)


def test_table_has_one_full_row_per_state() -> None:
    rows = state_table()
    assert set(rows) == set(loop_module.STATES)
    for state, columns in rows.items():
        assert tuple(columns) == COLUMNS, (state, columns)
        assert all(text.strip() for text in columns.values()), (state, columns)


def test_both_dispatches_handle_every_state() -> None:
    bodies = function_bodies()
    states = set(loop_module.STATES)
    assert states_named(bodies["conn_event"]) == states
    assert states_named(bodies["conn_expired"]) == states


def test_every_state_change_is_in_the_table() -> None:
    """Each function that sets a state is named in that state's "set by"."""
    rows = state_table()
    setters: dict[str, set[str]] = {}
    for name, body in function_bodies().items():
        for state in re.findall(r"\bc\.state = (S_\w+)", body):
            setters.setdefault(state, set()).add(name)
    assert set(setters) == set(rows)
    for state, names in setters.items():
        named = set(re.findall(r"\w+", rows[state]["set by"]))
        assert names <= named, (state, names - named)


def test_constants_shared_with_python() -> None:
    assert enum_members("BodyFraming") == loop_module.BODY_FRAMINGS
    assert loop_module.BODY_FRAMINGS == {
        name: getattr(verdicts, name) for name in ("BODY_NONE", "BODY_LENGTH", "BODY_CHUNKED",
                                                   "BODY_CLOSE")
    }
    assert enum_members("SpliceMode") == {
        f"SPLICE_{mode.upper()}": i for i, mode in enumerate(config.SPLICE_MODES)
    }
    assert loop_module.SPLICE_MODES == {mode: i for i, mode in enumerate(config.SPLICE_MODES)}


def test_no_def_constants_left() -> None:
    """DEF is deprecated in Cython 3: the constants are cdef enums (consts.pxi)."""
    for path in EXT.rglob("*.px?"):
        assert not re.search(r"^\s*DEF ", path.read_text(), re.M), path
