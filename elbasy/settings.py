"""What a setting of elbasy is: its declaration, and the kinds of value it holds.

Each setting is declared once, in :class:`elbasy.config.Config`: a field
declared with :func:`setting` carries its whole declaration (kind, default,
help, metavar, which component takes it), and the two settings that are not
one field (``--config`` and ``--listen``) are :class:`Setting` rows beside it.
Their tuple is ``elbasy.config.SETTINGS``, and everything else is derived from
it: the Config fields' validation, ``CONFIG_KEYS``, ``load_toml``/``to_toml``,
``build_config``, the ``elbasy`` command's options (name ``--NAME``, env var
``ELBASY_<NAME>``, help, metavar, default) and the keyword arguments of the
Loop, the Pacer and the quota's Safety (``Config.loop_settings()``...).

A :class:`Kind` is one way a value is checked, spelled on the command line
and in TOML, and handed on. The generic kinds live here (seconds, integers in
bounds, fractions, choices, flags, files and directories, strings); the ones tied to elbasy's
own syntax (listen addresses, connect-to rules, rule ids and tables) live in
:mod:`elbasy.config`. Adding a setting of a kind that exists is one line in
:class:`~elbasy.config.Config`; nothing here or in the CLI changes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from elbasy.toml import toml_value

__all__ = [
    "Choice",
    "ConfigError",
    "ConfigFile",
    "Directory",
    "File",
    "Flag",
    "Fraction",
    "Integer",
    "Kind",
    "Seconds",
    "Setting",
    "Target",
    "Text",
    "field_kinds",
    "field_settings",
    "is_int",
    "is_number",
    "part_of",
    "setting",
    "toml_value",
]

#: the components that take settings as keyword arguments (see ``Config.settings_for``)
Target = Literal["loop", "pacer", "safety"]

_SETTING = "elbasy.setting"
_PART_OF = "elbasy.part_of"


class ConfigError(ValueError):
    """A setting is invalid. ``field`` names the setting when there is one."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        self.reason = reason
        self.field = field
        super().__init__(f"{field}: {reason}" if field else reason)


def is_int(value: object) -> bool:
    """An int that is no bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int (no bool) or a float: what TOML calls a number."""
    return is_int(value) or isinstance(value, float)


# --------------------------------------------------------------------------- kinds


@dataclass(frozen=True, slots=True)
class Kind:
    """How one kind of setting is checked, read, written and handed on.

    The class attributes say how the command line and a config file spell
    it; the methods are the validator and the conversions. The defaults suit
    a setting that is one Config field spelled the same everywhere.
    """

    #: the TOML type a config file gives it (``CONFIG_KEYS``)
    toml: ClassVar[str] = "string"
    #: the type click converts the option's text to
    value_type: ClassVar[type] = str
    #: a repeatable option, whose environment variable is a space-separated list
    multiple: ClassVar[bool] = False
    #: the option's metavar unless the setting names one (None: click's own)
    metavar: ClassVar[str | None] = None

    def check(self, value: Any) -> object:
        """Validate one Config field's value; return it normalized.

        Raises :class:`ConfigError` with the reason only: the caller adds the field.
        """
        return value

    def parse(self, setting: Setting, value: Any) -> dict[str, object]:
        """The option's value (from click, the environment or a file) as Config fields."""
        return {setting.name: value}

    def dump(self, setting: Setting, config: Any) -> object:
        """The setting's value in ``config`` as its option and TOML key spell it; None: unset."""
        value = getattr(config, setting.name)
        return list(value) if isinstance(value, tuple) else value

    def native(self, value: Any) -> object:
        """A Config field's value as the component it is for takes it."""
        return value

    def from_file(self, value: Any, where: str) -> object:
        """A config file's value of a setting that has no option, checked against ``where``."""
        return value

    def toml_text(self, name: str, value: Any) -> str:
        """The setting as config file text (``name = value``)."""
        return f"{name} = {toml_value(value)}\n"


@dataclass(frozen=True, slots=True)
class Seconds(Kind):
    """A duration in seconds: without bounds, finite and > 0; with them, ``low`` to ``high``."""

    low: float | None = None
    high: float | None = None
    toml: ClassVar[str] = "number"
    value_type: ClassVar[type] = float
    metavar: ClassVar[str | None] = "SECONDS"

    def check(self, value: Any) -> float:
        if self.low is not None and self.high is not None:
            if not is_number(value) or not self.low <= value <= self.high:
                raise ConfigError(f"must be {self.low} to {self.high} seconds, got {value!r}")
            return float(value)
        if not is_number(value):
            raise ConfigError(f"must be a number of seconds, got {value!r}")
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"must be a finite number of seconds > 0, got {value!r}")
        return float(value)


@dataclass(frozen=True, slots=True)
class Fraction(Kind):
    """A fraction from 0 up to (not including) ``below``."""

    below: float = 1.0
    toml: ClassVar[str] = "number"
    value_type: ClassVar[type] = float
    metavar: ClassVar[str | None] = "FRACTION"

    def check(self, value: Any) -> float:
        if not is_number(value) or not 0 <= value < self.below:
            raise ConfigError(f"must be a fraction from 0 to {self.below}, got {value!r}")
        return float(value)


@dataclass(frozen=True, slots=True)
class Integer(Kind):
    """An integer from ``low`` to ``high``; ``hint`` says the bounds in words (``16 MiB``)."""

    low: int
    high: int
    hint: str | None = None
    toml: ClassVar[str] = "integer"
    value_type: ClassVar[type] = int
    metavar: ClassVar[str | None] = "N"

    def check(self, value: Any) -> int:
        if not is_int(value) or not self.low <= value <= self.high:
            hint = f" ({self.hint})" if self.hint else ""
            raise ConfigError(
                f"must be an integer from {self.low} to {self.high}{hint}, got {value!r}"
            )
        return int(value)


@dataclass(frozen=True, slots=True)
class Choice(Kind):
    """One of ``choices``, case-insensitive, kept lower case; ``index``: handed on as its index."""

    choices: tuple[str, ...]
    index: bool = False

    def check(self, value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in self.choices:
            raise ConfigError(f"must be one of {', '.join(self.choices)}; got {value!r}")
        return value.lower()

    def native(self, value: Any) -> object:
        return self.choices.index(value) if self.index else value


@dataclass(frozen=True, slots=True)
class ChoiceOrURL(Choice):
    """One of ``choices`` (lower cased), or a URL of one of ``schemes`` (kept as given:
    a password in it is case-sensitive)."""

    schemes: tuple[str, ...] = ()

    def check(self, value: Any) -> str:
        if isinstance(value, str) and "://" in value:
            scheme, rest = value.split("://", 1)
            if scheme.lower() in self.schemes and rest:
                return value
        if isinstance(value, str) and value.lower() in self.choices:
            return value.lower()
        urls = " or ".join(f"{s}://..." for s in self.schemes)
        raise ConfigError(f"must be one of {', '.join(self.choices)}, or {urls}; got {value!r}")


@dataclass(frozen=True, slots=True)
class Flag(Kind):
    """True or false: ``--name`` turns it on; ``negatable`` adds ``--no-name``."""

    negatable: bool = False
    toml: ClassVar[str] = "boolean"
    value_type: ClassVar[type] = bool

    def check(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ConfigError(f"must be true or false, got {value!r}")
        return value


@dataclass(frozen=True, slots=True)
class File(Kind):
    """A path to a file, or None."""

    metavar: ClassVar[str | None] = "FILE"

    def check(self, value: Any) -> str | None:
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"must be a path, got {value!r}")
        return value

    def parse(self, setting: Setting, value: Any) -> dict[str, object]:
        return {setting.name: str(value) if value is not None else None}


@dataclass(frozen=True, slots=True)
class Directory(File):
    """A path to a directory, or None."""

    metavar: ClassVar[str | None] = "DIR"


@dataclass(frozen=True, slots=True)
class Text(Kind):
    """A non-empty string."""

    def check(self, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"must be a non-empty string, got {value!r}")
        return value


@dataclass(frozen=True, slots=True)
class ConfigFile(File):
    """The config file to read (``--config``): the file's settings become the defaults."""

    toml: ClassVar[str] = ""


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting as the user sees it: an option, an environment variable, a config key.

    ``name`` is the Python name; the option is ``--name-with-dashes``, the
    environment variable ``ELBASY_NAME``, the config file key ``name``
    (dashes or underscores). ``fields`` are the :class:`~elbasy.config.Config`
    fields it sets (by default the one named ``name``); ``to`` is the
    component that takes it as the keyword argument ``arg`` (by default
    ``name``).
    """

    name: str
    kind: Kind
    help: str | None = None
    #: the option's metavar; None: the kind's
    metavar: str | None = None
    #: what ``--help`` shows as the default when the default is None
    default_text: str | None = None
    #: False: set in a config file only (the ``[[rule]]`` tables)
    option: bool = True
    #: False: no config file key (``--config`` itself)
    toml: bool = True
    fields: tuple[str, ...] | None = None
    to: Target | None = None
    arg: str | None = None

    @property
    def flag(self) -> str:
        """The long option: ``--keepalive-timeout``."""
        return "--" + self.name.replace("_", "-")

    @property
    def envvar(self) -> str:
        """``ELBASY_KEEPALIVE_TIMEOUT``."""
        return "ELBASY_" + self.name.upper()

    @property
    def field_names(self) -> tuple[str, ...]:
        return (self.name,) if self.fields is None else self.fields

    @property
    def option_metavar(self) -> str | None:
        return self.metavar if self.metavar is not None else self.kind.metavar

    @property
    def keyword(self) -> str:
        """The keyword argument ``to`` takes it as."""
        return self.arg or self.name


def setting(
    kind: Kind,
    default: object,
    help: str | None = None,
    *,
    metavar: str | None = None,
    default_text: str | None = None,
    option: bool = True,
    to: Target | None = None,
    arg: str | None = None,
) -> Any:
    """Declare a Config field and the setting it is (named by the field).

    ``keepalive_timeout: float = setting(Seconds(), 60.0, "Close idle ...", to="loop")``
    """
    declared = Setting(
        "",
        kind,
        help,
        metavar=metavar,
        default_text=default_text,
        option=option,
        to=to,
        arg=arg,
    )
    return dataclasses.field(default=default, metadata={_SETTING: declared})


def part_of(owner: str, kind: Kind, default: object) -> Any:
    """Declare a Config field that setting ``owner`` sets with others (``--listen``'s host)."""
    return dataclasses.field(default=default, metadata={_PART_OF: (owner, kind)})


def _fields(cls: type) -> tuple[dataclasses.Field[Any], ...]:
    return dataclasses.fields(cls)


def field_settings(cls: type) -> tuple[Setting, ...]:
    """The settings declared by ``cls``'s fields with :func:`setting`, named, in field order."""
    return tuple(
        dataclasses.replace(f.metadata[_SETTING], name=f.name)
        for f in _fields(cls)
        if _SETTING in f.metadata
    )


def field_kinds(cls: type) -> tuple[tuple[str, Kind, str], ...]:
    """Every field of ``cls`` as (field, kind that checks it, setting that sets it).

    Raises TypeError for a field declared neither with :func:`setting` nor :func:`part_of`.
    """
    out: list[tuple[str, Kind, str]] = []
    for f in _fields(cls):
        meta: Mapping[str, Any] = f.metadata
        if _SETTING in meta:
            out.append((f.name, meta[_SETTING].kind, f.name))
        elif _PART_OF in meta:
            owner, kind = meta[_PART_OF]
            out.append((f.name, kind, owner))
        else:
            raise TypeError(f"{cls.__name__}.{f.name} is declared without setting() or part_of()")
    return tuple(out)
