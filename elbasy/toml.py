"""TOML in and out, once for every file elbasy reads or writes.

The config file (``--config``, ``show-config``) and rule files (``elbasy
rules check``, the config's ``[[rule]]`` tables, the built-in rules) are
read by :func:`read_toml` and written with :func:`toml_value` and
:func:`toml_key`. Reading uses the standard library's ``tomllib``; writing
needs only one-line values (strings, booleans, numbers, arrays and inline
tables), which is all elbasy's files hold besides ``[[rule]]`` headers.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["TomlFileError", "parse_toml", "read_toml", "toml_key", "toml_value"]

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


class TomlFileError(Exception):
    """A TOML file that cannot be read (``unreadable``) or parsed; ``detail`` says why."""

    def __init__(self, origin: str, detail: str, unreadable: bool) -> None:
        what = "cannot read" if unreadable else "not valid TOML"
        super().__init__(f"{origin}: {what}: {detail}")
        self.origin = origin
        self.detail = detail
        self.unreadable = unreadable


def read_toml(path: str | Path) -> dict[str, Any]:
    """The document of the TOML file at ``path``; TomlFileError when it cannot be had."""
    try:
        with Path(path).open("rb") as f:
            data = f.read()
    except OSError as e:
        raise TomlFileError(str(path), str(e.strerror or e), True) from None
    return parse_toml(data.decode("utf-8", "replace"), str(path))


def parse_toml(text: str, origin: str) -> dict[str, Any]:
    """The document ``text`` holds (``origin`` names it in the error)."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise TomlFileError(origin, str(e), False) from None


def toml_key(key: str) -> str:
    """A key as TOML writes it: bare when it can be, quoted otherwise."""
    return key if _BARE_KEY.match(key) else toml_value(key)


def toml_value(value: Any) -> str:
    """A value on one line: strings, booleans, numbers, arrays and inline tables."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a valid TOML basic string
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        items = ", ".join(f"{toml_key(str(k))} = {toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")
