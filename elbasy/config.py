"""elbasy's configuration: the validated settings one proxy process runs with.

Plain data and parsing only. The single piece of I/O here is reading a TOML
config file (:func:`load_toml`); merging command line, environment and file is
the CLI's job (``elbasy.cli``), which builds a :class:`Config` at the end.

Connect-to rules follow curl's ``--connect-to HOST:PORT:CONNECT-TO-HOST:CONNECT-TO-PORT``:

* an empty ``HOST`` or ``PORT`` matches any host or port;
* an empty ``CONNECT-TO-HOST`` keeps the requested host, an empty
  ``CONNECT-TO-PORT`` keeps the requested port;
* IPv6 addresses are written in brackets (``[::1]``);
* unlike curl, ``HOST`` is a case-insensitive shell glob (:mod:`fnmatch`):
  ``*.example.com`` matches ``api.example.com`` and ``a.b.example.com`` but not
  ``example.com`` itself.

The first matching rule wins (:func:`route`).
"""

from __future__ import annotations

import ipaddress
import json
import math
import string
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from elbasy.rules import RuleSet

__all__ = [
    "CONFIG_KEYS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "SPLICE_MODES",
    "MAX_HEAD_BYTES_MAX",
    "MAX_HEAD_BYTES_MIN",
    "Config",
    "ConfigError",
    "ConnectTo",
    "format_hostport",
    "load_toml",
    "parse_listen",
    "route",
    "to_toml",
]

LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")
LOG_FORMATS: tuple[str, ...] = ("text", "json")
#: How CONNECT tunnels move bytes: "auto" copies small messages with
#: recv/send and splices a flow once it turns bulk; the others force one way
#: (for measurement, or kernels where splice misbehaves).
SPLICE_MODES: tuple[str, ...] = ("auto", "always", "never")
MAX_HEAD_BYTES_MIN = 1024
MAX_HEAD_BYTES_MAX = 16 * 1024 * 1024

_TIMEOUT_FIELDS = (
    "head_timeout",
    "connect_timeout",
    "idle_timeout",
    "keepalive_timeout",
    "response_timeout",
)

#: Keys a config file may hold (after turning dashes into underscores), with
#: the TOML types each accepts. They are the long option names of ``elbasy``.
CONFIG_KEYS: Mapping[str, str] = {
    "listen": "string",
    "log_level": "string",
    "log_format": "string",
    **{name: "number" for name in _TIMEOUT_FIELDS},
    "max_head_bytes": "integer",
    "splice": "string",
    "connect_to": "array of strings",
    "intercept": "array of strings",
    "data_dir": "string",
    "upstream_ca": "string",
    "unconstrained_ca": "boolean",
    # rules: which API rules are enabled, and the user's own ([[rule]] tables)
    "rules": "array of strings",
    "rule": "array of tables",
    # pacing (elbasy.pacing, elbasy.quota)
    "max_wait": "number",
    "retry_idempotent": "boolean",
    "quota_margin": "number",
}

_HOSTNAME_CHARS = frozenset(string.ascii_letters + string.digits + "-._")
_GLOB_CHARS = _HOSTNAME_CHARS | frozenset("*?[]!")


class ConfigError(ValueError):
    """A setting is invalid. ``field`` names the setting when there is one."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        self.reason = reason
        self.field = field
        super().__init__(f"{field}: {reason}" if field else reason)


def format_hostport(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets (``[::1]:8080``)."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


# --------------------------------------------------------------------------- connect-to


def _take_host(spec: str, i: int, part: str) -> tuple[str, int]:
    """Read a host field of ``spec`` starting at ``i``; return it and where it ends.

    A field starting with ``[`` whose ``]`` is followed by ``:`` (or the end)
    is bracketed: an IPv6 literal if it holds a ``:`` (returned without the
    brackets), otherwise a glob character class, kept as written.
    """
    if spec.startswith("[", i):
        close = spec.find("]", i)
        if close == -1:
            raise ConfigError(f"invalid connect-to {spec!r}: {part} has '[' without ']'")
        if close + 1 == len(spec) or spec[close + 1] == ":":
            inner = spec[i + 1 : close]
            if ":" in inner:
                return inner, close + 1
            return spec[i : close + 1], close + 1
    end = spec.find(":", i)
    if end == -1:
        end = len(spec)
    return spec[i:end], end


def _take_port(spec: str, i: int) -> tuple[str, int]:
    end = spec.find(":", i)
    if end == -1:
        end = len(spec)
    return spec[i:end], end


def _port_or_none(spec: str, part: str, text: str) -> int | None:
    if text == "":
        return None
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise ConfigError(
            f"invalid connect-to {spec!r}: {part} {text!r} must be a port number "
            "from 1 to 65535, or empty"
        )
    return int(text)


def _check_host_glob(spec: str, glob: str) -> str:
    if ":" in glob:  # an IPv6 literal (or glob) that was written in brackets
        ok = all(c in string.hexdigits or c in ":.*?%" for c in glob)
    else:
        ok = all(c in _GLOB_CHARS for c in glob)
    if not ok:
        raise ConfigError(
            f"invalid connect-to {spec!r}: HOST {glob!r} is not a host name, address or glob"
        )
    return glob.lower()


def _check_addr(spec: str, addr: str) -> str:
    if ":" in addr:
        try:
            ipaddress.IPv6Address(addr)
        except ValueError:
            raise ConfigError(
                f"invalid connect-to {spec!r}: CONNECT-TO-HOST [{addr}] is not an IPv6 address"
            ) from None
    elif addr.startswith("[") or not all(c in _HOSTNAME_CHARS for c in addr):
        raise ConfigError(
            f"invalid connect-to {spec!r}: CONNECT-TO-HOST {addr!r} is not a host name "
            "or address (no globs; IPv6 in brackets)"
        )
    return addr


@dataclass(frozen=True, slots=True)
class ConnectTo:
    """One ``--connect-to`` rule. Empty/None fields mean "any" (match side) or "keep"."""

    host_glob: str  # lower case; "" matches any host
    port: int | None  # None matches any port
    addr: str  # "" keeps the requested host; IPv6 without brackets
    addr_port: int | None  # None keeps the requested port

    @classmethod
    def parse(cls, spec: str) -> ConnectTo:
        """Parse curl's ``HOST:PORT:CONNECT-TO-HOST:CONNECT-TO-PORT``.

        >>> ConnectTo.parse("example.com:443:[::1]:8443")
        ConnectTo(host_glob='example.com', port=443, addr='::1', addr_port=8443)
        """
        spec = spec.strip()
        usage = (
            f"invalid connect-to {spec!r}: expected HOST:PORT:CONNECT-TO-HOST:CONNECT-TO-PORT "
            "(4 fields separated by ':', any may be empty, IPv6 addresses in brackets)"
        )
        if not spec:
            raise ConfigError(usage)
        host, i = _take_host(spec, 0, "HOST")
        if not spec.startswith(":", i):
            raise ConfigError(usage)
        port, i = _take_port(spec, i + 1)
        if not spec.startswith(":", i):
            raise ConfigError(usage)
        addr, i = _take_host(spec, i + 1, "CONNECT-TO-HOST")
        if not spec.startswith(":", i):
            raise ConfigError(usage)
        addr_port, i = _take_port(spec, i + 1)
        if i != len(spec):
            raise ConfigError(usage + f"; unexpected {spec[i:]!r} at the end")
        return cls(
            host_glob=_check_host_glob(spec, host),
            port=_port_or_none(spec, "PORT", port),
            addr=_check_addr(spec, addr),
            addr_port=_port_or_none(spec, "CONNECT-TO-PORT", addr_port),
        )

    def match(self, host: str, port: int) -> tuple[str, int] | None:
        """Where to dial for a request to ``host:port``, or None if this rule does not apply.

        ``host`` is compared case-insensitively, without IPv6 brackets or a trailing dot.
        """
        if self.port is not None and port != self.port:
            return None
        if self.host_glob:
            name = host.lower()
            if name.startswith("[") and name.endswith("]"):
                name = name[1:-1]
            elif name.endswith("."):
                name = name[:-1]
            if not fnmatchcase(name, self.host_glob):
                return None
        return (
            self.addr or host,
            self.addr_port if self.addr_port is not None else port,
        )

    def __str__(self) -> str:
        """The rule in the form :meth:`parse` reads."""

        def bracket(host: str) -> str:
            return f"[{host}]" if ":" in host else host

        port = "" if self.port is None else str(self.port)
        addr_port = "" if self.addr_port is None else str(self.addr_port)
        return f"{bracket(self.host_glob)}:{port}:{bracket(self.addr)}:{addr_port}"


def route(rules: Sequence[ConnectTo], host: str, port: int) -> tuple[str, int]:
    """Apply the first matching connect-to rule; without a match, ``(host, port)``."""
    for rule in rules:
        target = rule.match(host, port)
        if target is not None:
            return target
    return host, port


# --------------------------------------------------------------------------- listen


def parse_listen(value: str) -> tuple[str, int]:
    """Parse ``--listen HOST:PORT`` into ``(host, port)``.

    ``[::1]:8080`` gives ``("::1", 8080)``. An empty host (``:8080``) means all
    IPv4 interfaces, ``0.0.0.0``; use ``[::]:8080`` for all IPv6 ones. Port 0
    asks the kernel for a free port.
    """
    text = value.strip()
    bad = f"invalid listen address {value!r}: expected HOST:PORT, e.g. 127.0.0.1:8080"
    if text.startswith("["):
        close = text.find("]")
        if close == -1 or not text.startswith(":", close + 1):
            raise ConfigError(bad + " or [::1]:8080", "listen")
        host, port_text = text[1:close], text[close + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(
                f"invalid listen address {value!r}: [{host}] is not an IPv6 address", "listen"
            ) from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ConfigError(bad, "listen")
        if ":" in host:
            raise ConfigError(
                f"invalid listen address {value!r}: put an IPv6 address in brackets, "
                "e.g. [::1]:8080",
                "listen",
            )
        if host == "":
            host = "0.0.0.0"
        elif not all(c in _HOSTNAME_CHARS for c in host):
            raise ConfigError(
                f"invalid listen address {value!r}: {host!r} is not a host name or address",
                "listen",
            )
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise ConfigError(
            f"invalid listen address {value!r}: port {port_text!r} must be 0 to 65535", "listen"
        )
    return host, int(port_text)


# --------------------------------------------------------------------------- Config


@dataclass(frozen=True, slots=True)
class Config:
    """Everything one elbasy process needs to run, validated on construction."""

    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    log_level: str = "info"
    log_format: str = "text"
    head_timeout: float = 10.0
    connect_timeout: float = 10.0
    idle_timeout: float = 300.0
    keepalive_timeout: float = 60.0
    response_timeout: float = 60.0
    max_head_bytes: int = 65536
    splice: str = "auto"
    connect_to: tuple[ConnectTo, ...] = field(default=())
    #: host globs whose CONNECTs are intercepted (TLS terminated by elbasy)
    intercept: tuple[str, ...] = field(default=())
    #: where the CA lives; None: $XDG_DATA_HOME/elbasy
    data_dir: str | None = None
    #: extra CA bundle (PEM) trusted for upstream TLS, beside the system store
    upstream_ca: str | None = None
    #: a first-run CA without name constraints (intercepting arbitrary hosts)
    unconstrained_ca: bool = False
    # --- rules (elbasy.rules) ---
    #: ids of the enabled API rules; None: every rule (built-in and user)
    rules: tuple[str, ...] | None = None
    #: user rules (the config file's [[rule]] tables), same schema as the built-ins
    rule: tuple[Mapping[str, Any], ...] = field(default=())
    # --- pacing ---
    #: the longest a request waits for its quota; beyond it elbasy answers 429 at once
    max_wait: float = 30.0
    #: send an idempotent request refused by the API (429) once more, after the wait
    retry_idempotent: bool = False
    #: fraction of each limit's rate (and window's quota) left unused for safety
    quota_margin: float = 0.01

    def __post_init__(self) -> None:
        def fix(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        if not isinstance(self.listen_host, str) or not self.listen_host:
            raise ConfigError(
                f"must be a non-empty string, got {self.listen_host!r}", "listen_host"
            )
        if not _is_int(self.listen_port) or not 0 <= self.listen_port <= 65535:
            raise ConfigError(f"must be 0 to 65535, got {self.listen_port!r}", "listen_port")
        for name, allowed in (
            ("log_level", LOG_LEVELS),
            ("log_format", LOG_FORMATS),
            ("splice", SPLICE_MODES),
        ):
            value = getattr(self, name)
            if not isinstance(value, str) or value.lower() not in allowed:
                raise ConfigError(f"must be one of {', '.join(allowed)}; got {value!r}", name)
            fix(name, value.lower())
        for name in _TIMEOUT_FIELDS:
            value = getattr(self, name)
            if not (_is_int(value) or isinstance(value, float)):
                raise ConfigError(f"must be a number of seconds, got {value!r}", name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"must be a finite number of seconds > 0, got {value!r}", name)
            fix(name, float(value))
        if not _is_int(self.max_head_bytes) or not (
            MAX_HEAD_BYTES_MIN <= self.max_head_bytes <= MAX_HEAD_BYTES_MAX
        ):
            raise ConfigError(
                f"must be an integer from {MAX_HEAD_BYTES_MIN} to {MAX_HEAD_BYTES_MAX} "
                f"(16 MiB), got {self.max_head_bytes!r}",
                "max_head_bytes",
            )
        rules = tuple(self.connect_to)
        for rule in rules:
            if not isinstance(rule, ConnectTo):
                raise ConfigError(f"must hold ConnectTo rules, got {rule!r}", "connect_to")
        fix("connect_to", rules)
        globs = tuple(self.intercept)
        for glob in globs:
            if not isinstance(glob, str) or not glob or any(c not in _GLOB_CHARS for c in glob):
                if not (isinstance(glob, str) and ":" in glob):  # IPv6 literals
                    raise ConfigError(f"{glob!r} is not a host glob", "intercept")
        fix("intercept", tuple(g.lower() for g in globs))
        for name in ("data_dir", "upstream_ca"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"must be a path, got {value!r}", name)
        if not isinstance(self.unconstrained_ca, bool):
            raise ConfigError(
                f"must be true or false, got {self.unconstrained_ca!r}", "unconstrained_ca"
            )
        self._check_pacing(fix)
        self._check_rules(fix)

    def _check_pacing(self, fix: Any) -> None:
        if not (_is_int(self.max_wait) or isinstance(self.max_wait, float)) or not (
            0 <= self.max_wait <= 3600
        ):
            raise ConfigError(f"must be 0 to 3600 seconds, got {self.max_wait!r}", "max_wait")
        fix("max_wait", float(self.max_wait))
        if not isinstance(self.retry_idempotent, bool):
            raise ConfigError(
                f"must be true or false, got {self.retry_idempotent!r}", "retry_idempotent"
            )
        if not (_is_int(self.quota_margin) or isinstance(self.quota_margin, float)) or not (
            0 <= self.quota_margin < 0.5
        ):
            raise ConfigError(
                f"must be a fraction from 0 to 0.5, got {self.quota_margin!r}", "quota_margin"
            )
        fix("quota_margin", float(self.quota_margin))

    def _check_rules(self, fix: Any) -> None:
        from elbasy.rules import RuleError, parse_rule

        if self.rules is not None:
            ids = tuple(self.rules)
            if not all(isinstance(i, str) and i for i in ids):
                raise ConfigError(f"must be rule ids, got {self.rules!r}", "rules")
            fix("rules", ids)
        tables = tuple(self.rule)
        for table in tables:
            if not isinstance(table, Mapping):
                raise ConfigError(f"must hold rule tables, got {table!r}", "rule")
            try:
                parse_rule(table, "config")
            except RuleError as e:
                raise ConfigError(str(e), "rule") from None
        fix("rule", tables)
        try:
            self.ruleset()
        except RuleError as e:
            raise ConfigError(str(e), "rules" if str(e).startswith("unknown") else "rule") from None

    def ruleset(self) -> RuleSet:
        """The enabled rules: built-ins, overridden or joined by the user's, picked by ``rules``."""
        from elbasy.rules import RuleSet

        return RuleSet.load(self.rules, self.rule)

    @property
    def listen(self) -> str:
        """The listen address as ``--listen`` spells it."""
        return format_hostport(self.listen_host, self.listen_port)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --------------------------------------------------------------------------- TOML


def _check_toml_value(path: Path, key: str, value: object) -> object:
    kind = CONFIG_KEYS[key]
    where = f"config file {str(path)!r}, key {key!r}"
    if kind == "string" and isinstance(value, str):
        return value
    if kind == "number" and (_is_int(value) or isinstance(value, float)):
        return value
    if kind == "integer" and _is_int(value):
        return value
    if kind == "boolean" and isinstance(value, bool):
        return value
    if kind == "array of tables":
        if isinstance(value, list) and all(isinstance(v, dict) for v in value):
            return value
    if kind == "array of strings":
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    raise ConfigError(f"{where}: expected {kind}, got {value!r}")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a config file: keys are ``elbasy``'s long option names.

    Dashes in keys become underscores (``log-level`` == ``log_level``). An
    unknown key, a key given twice, a value of the wrong TOML type or an
    unreadable file raises :class:`ConfigError` naming the file (and key).
    ``connect_to`` may be one string or an array of strings.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key not in CONFIG_KEYS:
            raise ConfigError(
                f"config file {str(path)!r}: unknown key {raw_key!r} "
                f"(known: {', '.join(k.replace('_', '-') for k in CONFIG_KEYS)})"
            )
        if key in out:
            raise ConfigError(f"config file {str(path)!r}: key {raw_key!r} is given twice")
        out[key] = _check_toml_value(path, key, value)
    return out


def _toml_value(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a valid TOML basic string
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def to_toml(config: Config) -> str:
    """``config`` as a config file that :func:`load_toml` reads back to the same settings."""
    values: dict[str, object] = {
        "listen": config.listen,
        "log_level": config.log_level,
        "log_format": config.log_format,
        **{name: getattr(config, name) for name in _TIMEOUT_FIELDS},
        "max_head_bytes": config.max_head_bytes,
        "splice": config.splice,
        "connect_to": [str(rule) for rule in config.connect_to],
        "intercept": list(config.intercept),
        "data_dir": config.data_dir,
        "upstream_ca": config.upstream_ca,
        "unconstrained_ca": config.unconstrained_ca,
    }
    # rules: enabled ids here, user rules as [[rule]] tables after every plain key
    values["rules"] = list(config.rules) if config.rules is not None else None
    values["max_wait"] = config.max_wait
    values["retry_idempotent"] = config.retry_idempotent
    values["quota_margin"] = config.quota_margin
    text = "".join(
        f"{key} = {_toml_value(value)}\n" for key, value in values.items() if value is not None
    )
    from elbasy.rules import rule_to_toml

    return text + "".join("\n" + rule_to_toml(table, "rule") for table in config.rule)
