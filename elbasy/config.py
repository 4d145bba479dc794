"""elbasy's configuration: the validated settings one proxy process runs with.

Plain data and parsing only. The single piece of I/O here is reading a TOML
config file (:func:`load_toml`); merging command line, environment and file is
the CLI's job (``elbasy.cli``), which builds a :class:`Config` at the end.

Every setting is declared once, here: as a field of :class:`Config` (its kind,
default, help and the component it is for, see :mod:`elbasy.settings`), or,
for ``--config`` and ``--listen``, as a row just above it. :data:`SETTINGS`
holds them all, in the order ``elbasy --help`` and ``show-config`` list them;
``CONFIG_KEYS``, :func:`load_toml`, :func:`to_toml`, :func:`build_config`, the
CLI's options and the Loop's, Pacer's and Safety's keyword arguments
(:meth:`Config.loop_settings`...) are derived from it.

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

import difflib
import ipaddress
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from elbasy.redis_store import PASSWORD_ENV as REDIS_PASSWORD_ENV
from elbasy.redis_store import SCHEMES as REDIS_SCHEMES
from elbasy.settings import (
    Choice,
    ChoiceOrURL,
    ConfigError,
    ConfigFile,
    Directory,
    File,
    Flag,
    Fraction,
    Integer,
    Kind,
    Seconds,
    Setting,
    Target,
    Text,
    field_kinds,
    field_settings,
    is_int,
    is_number,
    part_of,
    setting,
)
from elbasy.toml import TomlFileError, read_toml

if TYPE_CHECKING:
    from elbasy.rules import RuleSet

__all__ = [
    "CONFIG_KEYS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "SETTINGS",
    "SPLICE_MODES",
    "MAX_HEAD_BYTES_MAX",
    "MAX_WORKERS",
    "MAX_HEAD_BYTES_MIN",
    "Config",
    "ConfigError",
    "ConnectTo",
    "ReverseTo",
    "build_config",
    "did_you_mean",
    "format_hostport",
    "load_toml",
    "parse_listen",
    "route",
    "setting_named",
    "to_toml",
    "unknown_environment",
    "worker_count",
]

LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")
LOG_FORMATS: tuple[str, ...] = ("text", "json", "logfmt")
#: How CONNECT tunnels move bytes: "auto" copies small messages with
#: recv/send and splices a flow once it turns bulk; the others force one way
#: (for measurement, or kernels where splice misbehaves).
SPLICE_MODES: tuple[str, ...] = ("auto", "always", "never")
MAX_HEAD_BYTES_MIN = 1024
MAX_HEAD_BYTES_MAX = 16 * 1024 * 1024

_HOSTNAME_CHARS = frozenset(string.ascii_letters + string.digits + "-._")
_GLOB_CHARS = _HOSTNAME_CHARS | frozenset("*?[]!")
_ENV_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "_")


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


# --------------------------------------------------------------------------- reverse


@dataclass(frozen=True, slots=True)
class ReverseTo:
    """One ``--reverse LISTEN=URL``: a listener whose clients reach one target.

    A client whose SDK takes a base URL points it at ``http://LISTEN``; each
    request is forwarded to the target (``https://`` verified, or ``http://``)
    and paced by the target's rule as a proxied one would be.
    """

    listen_host: str
    listen_port: int
    tls: bool  # the target speaks https
    host: str  # lower case; IPv6 without brackets
    port: int

    @classmethod
    def parse(cls, spec: str) -> ReverseTo:
        """Parse ``HOST:PORT=https://TARGET[:PORT]``.

        >>> str(ReverseTo.parse("127.0.0.1:9001=https://openapi.etsy.com:443/"))
        '127.0.0.1:9001=https://openapi.etsy.com'
        """
        spec = spec.strip()
        where, eq, url = spec.partition("=")
        usage = f"invalid reverse {spec!r}: expected LISTEN=URL, e.g. 127.0.0.1:9001=https://api.example.com"
        if not eq or not where or not url:
            raise ConfigError(usage)
        try:
            listen_host, listen_port = parse_listen(where)
        except ConfigError as e:
            raise ConfigError(f"invalid reverse {spec!r}: {e.reason}") from None
        scheme, sep, rest = url.partition("://")
        scheme = scheme.lower()
        if not sep or scheme not in ("http", "https"):
            raise ConfigError(
                f"invalid reverse {spec!r}: the target must be an http:// or https:// URL"
            )
        authority = rest[:-1] if rest.endswith("/") else rest
        if not authority or any(c in authority for c in "/?#@"):
            raise ConfigError(
                f"invalid reverse {spec!r}: the target is a scheme and host[:port] only "
                "(no path, query or credentials)"
            )
        from elbasy.errors import RemoteProtocolError
        from elbasy.protocol.targets import check_host, check_port

        host, port_text = authority, ""
        if authority.startswith("["):
            close = authority.find("]")
            host, port_text = authority[: close + 1], authority[close + 1 :]
            if close < 0 or (port_text and not port_text.startswith(":")):
                raise ConfigError(f"invalid reverse {spec!r}: bad IPv6 address in the target")
            port_text = port_text[1:]
        elif ":" in authority:
            host, _, port_text = authority.partition(":")
        try:
            host = check_host(host)
            port = check_port(port_text) if port_text else (443 if scheme == "https" else 80)
        except RemoteProtocolError as e:
            raise ConfigError(f"invalid reverse {spec!r}: {e}") from None
        return cls(listen_host, listen_port, scheme == "https", host, port)

    @property
    def origin(self) -> str:
        """The target as a URL's origin (``https://openapi.etsy.com``)."""
        scheme = "https" if self.tls else "http"
        default = 443 if self.tls else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}" + ("" if self.port == default else f":{self.port}")

    @property
    def listen(self) -> str:
        return format_hostport(self.listen_host, self.listen_port)

    def __str__(self) -> str:
        """The rule in the form :meth:`parse` reads."""
        return f"{self.listen}={self.origin}"


# --------------------------------------------------------------------------- kinds of elbasy's own


@dataclass(frozen=True, slots=True)
class Listen(Kind):
    """``--listen HOST:PORT`` (:func:`parse_listen`), held as two fields: host and port."""

    def parse(self, setting: Setting, value: Any) -> dict[str, object]:
        return dict(zip(setting.field_names, parse_listen(value), strict=True))

    def dump(self, setting: Setting, config: Any) -> object:
        host, port = (getattr(config, name) for name in setting.field_names)
        return format_hostport(host, port)


@dataclass(frozen=True, slots=True)
class Address(Kind):
    """An optional address of its own (``--metrics-listen HOST:PORT``), held as its text."""

    def check(self, value: Any) -> object:
        if value is None:
            return None
        return format_hostport(*parse_listen(value))


@dataclass(frozen=True, slots=True)
class Addresses(Kind):
    """Listening addresses of their own (``--transparent HOST:PORT``, repeatable), each
    held as its text (``127.0.0.1:443``, ``[::1]:443``); no two the same."""

    toml: ClassVar[str] = "array of strings"
    multiple: ClassVar[bool] = True

    def check(self, value: Any) -> tuple[str, ...]:
        out: list[str] = []
        for text in value:
            where = format_hostport(*parse_listen(str(text)))
            if where in out and not where.endswith(":0"):
                raise ConfigError(f"{where} is given twice")
            out.append(where)
        return tuple(out)


@dataclass(frozen=True, slots=True)
class ConnectRules(Kind):
    """``--connect-to`` rules, written as :meth:`ConnectTo.parse` reads them, held parsed."""

    toml: ClassVar[str] = "array of strings"
    multiple: ClassVar[bool] = True

    def check(self, value: Any) -> tuple[ConnectTo, ...]:
        rules = tuple(value)
        for rule in rules:
            if not isinstance(rule, ConnectTo):
                raise ConfigError(f"must hold ConnectTo rules, got {rule!r}")
        return rules

    def parse(self, setting: Setting, value: Any) -> dict[str, object]:
        return {setting.name: tuple(ConnectTo.parse(spec) for spec in value)}

    def dump(self, setting: Setting, config: Any) -> object:
        return [str(rule) for rule in getattr(config, setting.name)]


@dataclass(frozen=True, slots=True)
class ReverseRules(Kind):
    """``--reverse LISTEN=URL`` listeners, written as :meth:`ReverseTo.parse` reads them,
    held parsed; no two on one address, none on ``--listen``'s (checked by the Config)."""

    toml: ClassVar[str] = "array of strings"
    multiple: ClassVar[bool] = True

    def check(self, value: Any) -> tuple[ReverseTo, ...]:
        rules = tuple(value)
        seen: set[tuple[str, int]] = set()
        for rule in rules:
            if not isinstance(rule, ReverseTo):
                raise ConfigError(f"must hold ReverseTo rules, got {rule!r}")
            where = (rule.listen_host, rule.listen_port)
            if rule.listen_port and where in seen:
                raise ConfigError(f"two reverse listeners on {rule.listen}")
            seen.add(where)
        return rules

    def parse(self, setting: Setting, value: Any) -> dict[str, object]:
        return {setting.name: tuple(ReverseTo.parse(spec) for spec in value)}

    def dump(self, setting: Setting, config: Any) -> object:
        return [str(rule) for rule in getattr(config, setting.name)]


@dataclass(frozen=True, slots=True)
class HostGlobs(Kind):
    """Host globs (``*.myshopify.com``) or IPv6 literals, kept lower case."""

    toml: ClassVar[str] = "array of strings"
    multiple: ClassVar[bool] = True

    def check(self, value: Any) -> tuple[str, ...]:
        globs = tuple(value)
        for glob in globs:
            if not isinstance(glob, str) or not glob or any(c not in _GLOB_CHARS for c in glob):
                if not (isinstance(glob, str) and ":" in glob):  # IPv6 literals
                    raise ConfigError(f"{glob!r} is not a host glob")
        return tuple(g.lower() for g in globs)


@dataclass(frozen=True, slots=True)
class PortRanges(Kind):
    """Ports and ranges of them (``443``, ``8000-8999``; commas or repeats), held as
    (low, high) pairs."""

    toml: ClassVar[str] = "array of ports"
    multiple: ClassVar[bool] = True
    metavar: ClassVar[str | None] = "PORT[-PORT]"

    def check(self, value: Any) -> tuple[tuple[int, int], ...]:
        ranges = tuple(value)
        for pair in ranges:
            ok = isinstance(pair, tuple) and len(pair) == 2 and all(is_int(p) for p in pair)
            if not ok or not 1 <= pair[0] <= pair[1] <= 65535:
                raise ConfigError(f"must hold port ranges from 1 to 65535, got {pair!r}")
        if not ranges:
            raise ConfigError("must name at least one port (1-65535: any)")
        return ranges

    def parse(self, setting: Setting, value: Any) -> dict[str, object]:
        items = [value] if isinstance(value, str | int) else list(value)
        out: list[tuple[int, int]] = []
        for item in items:
            for text in str(item).split(","):
                out.append(_port_range(text.strip()))
        return {setting.name: tuple(out)}

    def dump(self, setting: Setting, config: Any) -> object:
        return [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in getattr(config, setting.name)]


def _port_range(text: str) -> tuple[int, int]:
    low, dash, high = text.partition("-")
    parts = (low, high) if dash else (low, low)
    if not all(p.isascii() and p.isdigit() and 1 <= int(p) <= 65535 for p in parts):
        raise ConfigError(f"{text!r} is not a port (1 to 65535) or a range of them (8000-8999)")
    lo, hi = int(parts[0]), int(parts[1])
    if lo > hi:
        raise ConfigError(f"{text!r}: the range's first port is above its last")
    return lo, hi


@dataclass(frozen=True, slots=True)
class RuleIds(Kind):
    """Ids of API rules: ``--rules a,b`` or a config file's list; None: every rule."""

    toml: ClassVar[str] = "array of strings"

    def check(self, value: Any) -> tuple[str, ...] | None:
        if value is None:
            return None
        ids = tuple(value)
        if not all(isinstance(i, str) and i for i in ids):
            raise ConfigError(f"must be rule ids, got {value!r}")
        return ids

    def parse(self, setting: Setting, value: Any) -> dict[str, object]:
        if value is None:
            return {setting.name: None}
        items = [value] if isinstance(value, str) else list(value)
        ids = tuple(i.strip() for item in items for i in item.split(",") if i.strip())
        return {setting.name: ids}

    def dump(self, setting: Setting, config: Any) -> object:
        ids = getattr(config, setting.name)
        return list(ids) if ids is not None else None


@dataclass(frozen=True, slots=True)
class EnvName(Kind):
    """The name of an environment variable (``--auth-env NAME``), or None."""

    metavar: ClassVar[str | None] = "NAME"

    def check(self, value: Any) -> str | None:
        if value is None:
            return None
        if (
            not isinstance(value, str)
            or not value
            or value[0].isdigit()
            or any(c not in _ENV_NAME_CHARS for c in value)
        ):
            raise ConfigError(f"must be an environment variable's name, got {value!r}")
        return value


@dataclass(frozen=True, slots=True)
class Networks(Kind):
    """Client networks: ``--allow-clients 10.0.0.0/8,::1`` (repeatable; the environment
    variable's are separated by commas or spaces) or a config file's list, held as
    ``ipaddress`` spells each network (an address alone is its /32 or /128)."""

    toml: ClassVar[str] = "array of strings"
    multiple: ClassVar[bool] = True
    metavar: ClassVar[str | None] = "CIDR[,CIDR]"

    def check(self, value: Any) -> tuple[str, ...]:
        out = []
        for item in tuple(value):
            try:
                out.append(str(ipaddress.ip_network(item, strict=False)))
            except (TypeError, ValueError):
                raise ConfigError(
                    f"{item!r} is not a network (a CIDR such as 10.0.0.0/8, or an address)"
                ) from None
        return tuple(out)

    def parse(self, setting: Setting, value: Any) -> dict[str, object]:
        items = [value] if isinstance(value, str) else list(value or ())
        return {setting.name: tuple(n.strip() for i in items for n in i.split(",") if n.strip())}

    def dump(self, setting: Setting, config: Any) -> object:
        networks = getattr(config, setting.name)
        return list(networks) if networks else None  # none: every client


@dataclass(frozen=True, slots=True)
class RuleTables(Kind):
    """User rules, as the config file's ``[[rule]]`` tables (the built-ins' schema)."""

    toml: ClassVar[str] = "array of tables"

    def check(self, value: Any) -> tuple[Mapping[str, Any], ...]:
        # only their shape here: what they say is checked once, where the
        # Config builds its rules (Config.__post_init__, elbasy.rules.check_rules)
        tables = tuple(value)
        for table in tables:
            if not isinstance(table, Mapping):
                raise ConfigError(f"must hold rule tables, got {table!r}")
        return tables

    def parse(self, setting: Setting, value: Any) -> dict[str, object]:
        return {setting.name: tuple(value)}

    def from_file(self, value: Any, where: str) -> object:
        # by the same check as every rule (elbasy.rules.check_rules), here so
        # that its errors name the file
        from elbasy.rules import RuleError, check_rules

        try:
            check_rules(value, where)
        except RuleError as e:
            raise ConfigError(str(e)) from None
        return value

    def toml_text(self, name: str, value: Any) -> str:
        from elbasy.rules import rule_to_toml

        return "".join("\n" + rule_to_toml(table, name) for table in value)


#: at most this many workers: each takes a slot of the shared quota store's
#: 32, and a reload runs the old and the new ones side by side for a while
MAX_WORKERS = 16


@dataclass(frozen=True, slots=True)
class Workers(Kind):
    """``--workers N`` (1 to MAX_WORKERS) or ``auto``: one per CPU this process may run on."""

    toml: ClassVar[str] = 'integer or "auto"'
    metavar: ClassVar[str | None] = "N|auto"

    def check(self, value: Any) -> int | str:
        if isinstance(value, str):
            text = value.strip().lower()
            if text == "auto":
                return "auto"
            if text.isascii() and text.isdigit():
                value = int(text)
        if not is_int(value) or not 1 <= value <= MAX_WORKERS:
            raise ConfigError(f"must be 1 to {MAX_WORKERS}, or auto; got {value!r}")
        return int(value)


def worker_count(workers: int | str) -> int:
    """How many worker processes ``--workers`` asks for (``auto``: the usable CPUs, capped)."""
    if workers == "auto":
        import os

        return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
    return int(workers)


# --------------------------------------------------------------------------- Config

#: where quota lives (``--quota-store``); auto is shm: a reload or a restarted
#: worker keeps every account's clocks. Or a Redis URL (elbasy.redis_store)
QUOTA_STORES = ("auto", "shm", "local")
#: the URL schemes of ``--quota-store`` for a Redis server shared by a fleet
QUOTA_REDIS_SCHEMES = REDIS_SCHEMES
QUOTA_CAPACITY_MIN = 64
QUOTA_CAPACITY_MAX = 1 << 24
#: the most elbasy machines ``--quota-instances`` may say share one Redis
QUOTA_INSTANCES_MAX = 1024

#: ``--config FILE``: read before the other options; its keys are their names
CONFIG_FILE = Setting(
    "config",
    ConfigFile(),
    "TOML file whose keys are these options' long names (listen, connect_to, ...).",
    toml=False,
    fields=(),
)
#: ``--listen HOST:PORT``: Config holds it as ``listen_host`` and ``listen_port``
LISTEN = Setting(
    "listen",
    Listen(),
    "Address to accept clients on; port 0 picks a free port, ':PORT' means all interfaces.",
    metavar="HOST:PORT",
    fields=("listen_host", "listen_port"),
)


@dataclass(frozen=True, slots=True)
class Config:
    """Everything one elbasy process needs to run, validated on construction.

    Each field declares its setting (:func:`~elbasy.settings.setting`): the
    kind that checks it, its default, the option's help, and the component
    (``to``) that takes it. The field's name is the setting's name.
    """

    listen_host: str = part_of("listen", Text(), "127.0.0.1")
    listen_port: int = part_of("listen", Integer(0, 65535), 8080)
    log_level: str = setting(Choice(LOG_LEVELS), "info", "Log messages of this level and above.")
    log_format: str = setting(
        Choice(LOG_FORMATS),
        "text",
        "Log lines as plain text, as one JSON object each, or as logfmt key=value pairs.",
    )
    log_file: str | None = setting(
        File(),
        None,
        "Append log lines to this file (reopened on SIGUSR1, for log rotation).",
        metavar="PATH",
        default_text="stderr",
    )
    access_log: str = setting(
        Text(),
        "-",
        "Where the access lines (one per request or tunnel) go: '-' with the other log"
        " lines, a file of their own (appended, reopened on SIGUSR1), or 'off'.",
        metavar="FILE|-|off",
    )
    # --- who may use the proxy (elbasy.access) ---
    auth_file: str | None = setting(
        File(),
        None,
        "Ask clients for proxy credentials (Proxy-Authorization: Basic or Bearer), one "
        "'user:password' or bare token a line in this file ('#' lines are comments); "
        "read again on reload. elbasy's own pages then take them in Authorization.",
        metavar="PATH",
        default_text="no authentication",
    )
    auth_env: str | None = setting(
        EnvName(),
        None,
        "Also take credentials from this environment variable (space-separated, as in "
        "--auth-file), so no secret is on the command line or in the config file.",
        default_text="none",
    )
    allow_clients: tuple[str, ...] = setting(
        Networks(),
        (),
        "Close, at accept and unanswered, connections from addresses outside these networks "
        "(comma-separated, repeatable); the default lets any client in.",
    )
    # --- what elbasy shows of itself (elbasy.metrics) ---
    metrics_listen: str | None = setting(
        Address(),
        None,
        "Also serve /metrics on this address (the supervisor answers: a scrape never "
        "waits for a busy worker), without authentication: bind it to a private address. "
        "/metrics on the proxy's own address works either way.",
        metavar="HOST:PORT",
        default_text="off",
    )
    metrics_top_accounts: int = setting(
        Integer(0, 1000),
        10,
        "/metrics labels the quota wait, requests and queue of this many accounts, "
        "the busiest by wait (0: none).",
    )
    # --- processes (elbasy.supervisor) ---
    workers: int | str = setting(
        Workers(),
        1,
        "Worker processes sharing the listener; 'auto': one per CPU (at most 16).",
    )
    drain_timeout: float = setting(
        Seconds(0, 3600),
        30.0,
        "On SIGTERM, Ctrl-C or a reload, let requests in flight and held for quota finish "
        "this long; the rest get 503 with Retry-After.",
    )
    # --- the loop's deadlines and limits ---
    head_timeout: float = setting(
        Seconds(), 10.0, "Close clients whose request head is late.", to="loop"
    )
    connect_timeout: float = setting(Seconds(), 10.0, "Give up dialing upstream (504).", to="loop")
    idle_timeout: float = setting(
        Seconds(), 300.0, "Close CONNECT tunnels idle this long.", to="loop"
    )
    keepalive_timeout: float = setting(
        Seconds(),
        60.0,
        "Close idle keep-alive client and pooled upstream connections.",
        to="loop",
    )
    response_timeout: float = setting(
        Seconds(), 60.0, "Wait this long for an upstream response head (504).", to="loop"
    )
    exchange_timeout: float = setting(
        Seconds(),
        300.0,
        "A forwarded request's whole exchange (its body up, its answer down) ends within "
        "this, however its bytes trickle (504 before the answer's head, else closed).",
        to="loop",
    )
    max_connections: int = setting(
        Integer(0, 10_000_000),
        0,
        "Answer 503 at once to a new client connection beyond this many open, every "
        "worker's counted (0: only the fd limit).",
        to="loop",
        default_text="0, off",
    )
    max_client_connections: int = setting(
        Integer(0, 10_000_000),
        0,
        "Answer 503 at once to a client address with this many connections open "
        "already, on any worker (0: no limit).",
        to="loop",
        default_text="0, off",
    )
    max_head_bytes: int = setting(
        Integer(MAX_HEAD_BYTES_MIN, MAX_HEAD_BYTES_MAX, "16 MiB"),
        65536,
        "Largest request head (431 beyond) or response head (502) accepted.",
        to="loop",
    )
    splice: str = setting(
        Choice(SPLICE_MODES, index=True),  # the loop takes the mode's index
        "auto",
        "How tunnels move bytes: auto copies small messages and splices bulk flows.",
        to="loop",
    )
    # --- where connections go, which are intercepted ---
    connect_to: tuple[ConnectTo, ...] = setting(
        ConnectRules(),
        (),
        "Dial ADDR:PORT for HOST:PORT (curl syntax; HOST is a glob; empty fields mean "
        "any/keep; IPv6 in brackets). Repeatable; the first match wins.",
        metavar="HOST:PORT:ADDR:PORT",
    )
    reverse: tuple[ReverseTo, ...] = setting(
        ReverseRules(),
        (),
        "Also listen on LISTEN as a reverse proxy to the URL's origin (e.g. "
        "127.0.0.1:9001=https://openapi.etsy.com): clients use http://LISTEN as their "
        "base URL; requests are paced like proxied ones. Repeatable.",
        metavar="LISTEN=URL",
    )
    transparent: tuple[str, ...] = setting(
        Addresses(),
        (),
        "Also listen on HOST:PORT (e.g. :443) for clients sent there by DNS, /etc/hosts "
        "or an iptables REDIRECT: a TLS client is intercepted or spliced by the name in "
        "its ClientHello, a plain HTTP one routed by its Host. Repeatable.",
        metavar="HOST:PORT",
    )
    listen_tls: str | None = setting(
        Address(),
        None,
        "Also listen on HOST:PORT for clients that reach the proxy over TLS "
        "(HTTPS_PROXY=https://HOST:PORT): the same proxy, its tunnels relayed through "
        "the TLS session and intercepted hosts TLS inside it.",
        metavar="HOST:PORT",
        default_text="off",
    )
    tls_cert: str | None = setting(
        File(),
        None,
        "The --listen-tls certificate chain (PEM), with --tls-key.",
        default_text="one elbasy makes for the listener's names, in the data dir",
    )
    tls_key: str | None = setting(
        File(), None, "The --listen-tls certificate's private key (PEM)."
    )
    # --- where requests and tunnels may go (elbasy.destinations) ---
    allow_hosts: tuple[str, ...] = setting(
        HostGlobs(),
        (),
        "Only hosts matching one of these globs may be reached (403 for the others); "
        "repeatable. Unset: any host.",
        metavar="GLOB",
        default_text="any host",
    )
    deny_hosts: tuple[str, ...] = setting(
        HostGlobs(),
        (),
        "Hosts matching one of these globs are never reached (403); repeatable.",
        metavar="GLOB",
    )
    allow_ports: tuple[tuple[int, int], ...] = setting(
        PortRanges(),
        ((443, 443),),
        "Ports a CONNECT tunnel may reach (ranges like 8000-8999; 1-65535: any); "
        "repeatable. Plain http:// requests may go to any port of an allowed host.",
        default_text="443",
    )
    allow_internal: tuple[str, ...] = setting(
        HostGlobs(),
        (),
        "Hosts matching one of these globs may resolve to internal addresses (loopback, "
        "private, link-local, CGNAT...), which are refused (403) for every other host; "
        "repeatable. Addresses --connect-to names are the operator's choice and pass.",
        metavar="GLOB",
    )
    dns_timeout: float = setting(
        Seconds(0.1, 60),
        5.0,
        "Longest one name's lookup may take; beyond it its requests fail (502) and the "
        "lookup is left to finish on its own thread.",
    )
    intercept: tuple[str, ...] = setting(
        HostGlobs(),
        (),
        "Terminate TLS for CONNECTs to hosts matching GLOB (e.g. '*.myshopify.com'; each "
        "'*' is one label) and relay each request; repeatable. Other hosts get a spliced "
        "tunnel.",
        metavar="GLOB",
    )
    data_dir: str | None = setting(
        Directory(),
        None,
        "Where the CA lives (made on first run).",
        default_text="$XDG_DATA_HOME/elbasy",
    )
    upstream_ca: str | None = setting(
        File(),
        None,
        "Also trust these CA certificates (PEM) when verifying upstream TLS.",
        default_text="the system's roots only",
    )
    unconstrained_ca: bool = setting(
        Flag(),
        False,
        "On first run, make a CA without name constraints (it can issue for ANY host).",
    )
    leaf_mint_rate: int = setting(
        Integer(0, 1_000_000),
        60,
        "New leaf certificates a minute for one client address, after --leaf-mint-burst "
        "(a worker allows 4 times as many for all clients; 0: no limit). Leaves already "
        "made are always served.",
        metavar="N",
    )
    leaf_mint_burst: int = setting(
        Integer(1, 1_000_000),
        20,
        "New leaf certificates one client address may have minted at once.",
        metavar="N",
    )
    leaf_cache_files: int = setting(
        Integer(1, 10_000_000),
        1000,
        "Most leaf certificate files kept in the data dir; the least recently used go first.",
        metavar="N",
    )
    # --- rules (elbasy.rules) ---
    rules: tuple[str, ...] | None = setting(
        RuleIds(),
        None,
        "Enable only these API rules (see `elbasy rules list`).",
        metavar="ID,ID",
        default_text="every rule",
    )
    rule: tuple[Mapping[str, Any], ...] = setting(
        RuleTables(),
        (),
        "User rules (the config file's [[rule]] tables), same schema as the built-ins.",
        option=False,
    )
    # --- pacing (elbasy.pacing, elbasy.quota) ---
    max_wait: float = setting(
        Seconds(0, 3600),
        30.0,
        "Longest a request waits for its quota; beyond it elbasy answers 429 with Retry-After "
        "(per request: X-Elbasy-Max-Wait).",
        to="pacer",
    )
    retry_idempotent: bool = setting(
        Flag(negatable=True),
        False,
        "Send an idempotent request the API refused with 429 once more after the wait, "
        "so the client never sees the 429.",
        to="pacer",
    )
    quota_margin: float = setting(
        Fraction(0.5),
        0.01,
        "Part of each limit's rate left unused against network jitter.",
        to="safety",
        arg="margin",
    )
    quota_store: str = setting(
        ChoiceOrURL(QUOTA_STORES, schemes=QUOTA_REDIS_SCHEMES),
        "auto",
        "Where accounts' quota lives: shm (one table in shared memory, shared exactly by "
        "every worker, kept across restarts and reloads), local (one worker's memory), "
        "auto (shm), or redis://HOST:PORT/DB (also rediss://, unix://, "
        "redis+sentinel://HOST:PORT[,HOST:PORT]/SERVICE[/DB], redis+cluster://HOST:PORT; "
        "password from the URL or ELBASY_REDIS_PASSWORD): one Redis shared by every "
        "machine, its steps sent without the worker waiting for them.",
    )
    quota_instances: int = setting(
        Integer(1, QUOTA_INSTANCES_MAX),
        1,
        "Machines (elbasy instances) sharing the Redis quota store. While Redis is "
        "unreachable this machine's workers keep to 1 / instances of every account's "
        "capacity and rate (one table in shared memory), so the fleet stays within each "
        "limit; 1 assumes this machine is alone.",
    )
    quota_redis_timeout: float = setting(
        Seconds(0.01, 10),
        0.25,
        "Longest a quota step waits for Redis; beyond it the worker falls back to its "
        "local share (see --quota-instances) and asks Redis again with backoff "
        "(0.5 s doubling to 10 s).",
    )
    quota_capacity: int = setting(
        Integer(QUOTA_CAPACITY_MIN, QUOTA_CAPACITY_MAX, "16 M"),
        65536,
        "Buckets the shared quota table holds (one per limit of each account); when full, "
        "the least recently used idle bucket makes room.",
    )

    def __post_init__(self) -> None:
        for name, kind, _ in _FIELD_KINDS:
            try:
                value = kind.check(getattr(self, name))
            except ConfigError as e:
                raise ConfigError(e.reason, name) from None
            object.__setattr__(self, name, value)
        for rule in self.reverse:
            if rule.listen_port and (rule.listen_host, rule.listen_port) == (
                self.listen_host,
                self.listen_port,
            ):
                raise ConfigError(f"{rule}: {rule.listen} is the proxy's --listen", "reverse")
        proxy = format_hostport(self.listen_host, self.listen_port)
        if self.listen_tls is not None and self.listen_tls == proxy and self.listen_port:
            raise ConfigError(f"{self.listen_tls} is the proxy's --listen", "listen_tls")
        for where in self.transparent:
            if where == proxy and self.listen_port:
                raise ConfigError(f"{where} is the proxy's --listen", "transparent")
        from elbasy.rules import RuleError

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

    def settings_for(self, target: Target) -> dict[str, Any]:
        """The keyword arguments ``target`` takes from these settings (those declared ``to`` it)."""
        return {s.keyword: s.kind.native(getattr(self, s.name)) for s in SETTINGS if s.to == target}

    def loop_settings(self) -> dict[str, Any]:
        """The Loop's keyword arguments: its deadlines, head limit and splice mode."""
        return self.settings_for("loop")

    def pacer_settings(self) -> dict[str, Any]:
        """The Pacer's keyword arguments (``max_wait``, ``retry_idempotent``)."""
        return self.settings_for("pacer")

    def safety_settings(self) -> dict[str, Any]:
        """The quota Safety's keyword arguments (``margin``)."""
        return self.settings_for("safety")


#: Every setting, in the order of ``elbasy --help`` and ``show-config``.
SETTINGS: tuple[Setting, ...] = (CONFIG_FILE, LISTEN, *field_settings(Config))
#: Each Config field with the kind that checks it and the setting that sets it.
_FIELD_KINDS = field_kinds(Config)
_BY_NAME: Mapping[str, Setting] = {s.name: s for s in SETTINGS}
_OWNER: Mapping[str, str] = {name: owner for name, _, owner in _FIELD_KINDS}


def _check_table() -> None:
    """The declarations fit together: one setting per name and per field, targets on one field."""
    if len(_BY_NAME) != len(SETTINGS):
        raise TypeError("two settings share a name")
    claimed = [name for s in SETTINGS for name in s.field_names]
    if sorted(claimed) != sorted(_OWNER) or any(
        _OWNER[name] != s.name for s in SETTINGS for name in s.field_names
    ):
        raise TypeError(f"settings and Config fields disagree: {claimed} vs {list(_OWNER)}")
    for s in SETTINGS:
        if s.to is not None and s.field_names != (s.name,):
            raise TypeError(f"setting {s.name!r} goes to the {s.to} but is not one field")


_check_table()


def setting_named(name: str | None) -> Setting | None:
    """The setting called ``name``, or the one that sets the Config field ``name``."""
    if name is None:
        return None
    return _BY_NAME.get(_OWNER.get(name, name))


def build_config(**options: Any) -> Config:
    """A :class:`Config` from settings spelled as ``elbasy``'s options, by their Python names.

    ``listen="[::1]:0"``; ``connect_to`` and ``intercept`` are lists of strings;
    ``rules`` is ``--rules``: ids separated by commas (or a list of them), None
    enables every rule; ``rule`` holds the config file's ``[[rule]]`` tables.
    Settings not given keep their defaults.

    Raises :class:`ConfigError` whose ``field`` is the option's name.
    """
    fields: dict[str, Any] = {}
    for name, value in options.items():
        s = _BY_NAME.get(name)
        if s is None or not s.field_names:
            raise TypeError(f"build_config() got an unexpected keyword argument {name!r}")
        try:
            fields.update(s.kind.parse(s, value))
        except ConfigError as e:
            raise ConfigError(e.reason, name) from None
    return Config(**fields)


# --------------------------------------------------------------------------- TOML

#: Keys a config file may hold (after turning dashes into underscores), with
#: the TOML types each accepts. They are the long option names of ``elbasy``.
CONFIG_KEYS: Mapping[str, str] = {s.name: s.kind.toml for s in SETTINGS if s.toml}


def _check_toml_value(path: Path, key: str, value: object, raw_key: str) -> object:
    kind = CONFIG_KEYS[key]
    where = f"config file {str(path)!r}, key {raw_key!r}"
    if kind == "string" and isinstance(value, str):
        return value
    if kind == "number" and is_number(value):
        return value
    if kind == "integer" and is_int(value):
        return value
    if kind == "boolean" and isinstance(value, bool):
        return value
    if kind == 'integer or "auto"' and (is_int(value) or isinstance(value, str)):
        return value
    if kind == "array of tables":
        if isinstance(value, list) and all(isinstance(v, dict) for v in value):
            return value
    if kind == "array of ports":
        items = value if isinstance(value, list) else [value]
        if all(isinstance(v, str) or is_int(v) for v in items):
            return [str(v) for v in items]
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
        data = read_toml(path)
    except TomlFileError as e:
        if e.unreadable:
            raise ConfigError(f"cannot read config file {str(path)!r}: {e.detail}") from None
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e.detail}") from None
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key not in CONFIG_KEYS:
            guess = did_you_mean(key, CONFIG_KEYS)
            if guess is not None and "-" in raw_key:
                guess = guess.replace("_", "-")  # in the file's spelling
            hint = f"did you mean {guess!r}?" if guess else "`elbasy show-config` prints every key"
            raise ConfigError(f"config file {str(path)!r}: unknown key {raw_key!r} ({hint})")
        if key in out:
            raise ConfigError(f"config file {str(path)!r}: key {raw_key!r} is given twice")
        out[key] = _check_toml_value(path, key, value, raw_key)
    return out


def did_you_mean(name: str, known: Iterable[str]) -> str | None:
    """The one of ``known`` that ``name`` is most likely a typo of, if any is close."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    return close[0] if close else None


#: ``ELBASY_*`` environment variables that are no setting's but still elbasy's
OTHER_ENVVARS: tuple[str, ...] = (REDIS_PASSWORD_ENV,)


def unknown_environment(environ: Mapping[str, str], config: Config | None = None) -> list[str]:
    """One warning for each ``ELBASY_*`` variable in ``environ`` that elbasy does not read
    (a typo such as ``ELBASY_MAX_WIAT`` is otherwise silently ignored), with the name it
    most likely meant. ``config``'s ``--auth-env`` variable is one elbasy reads."""
    known = [s.envvar for s in SETTINGS if s.option] + list(OTHER_ENVVARS)
    if config is not None and config.auth_env:
        known.append(config.auth_env)
    out = []
    for name in sorted(environ):
        if not name.startswith("ELBASY_") or name in known:
            continue
        guess = did_you_mean(name[7:], [k[7:] for k in known if k.startswith("ELBASY_")])
        hint = f"; did you mean ELBASY_{guess}?" if guess else " (see `elbasy --help`)"
        out.append(f"ignoring the environment variable {name}: no such setting{hint}")
    return out


def to_toml(config: Config) -> str:
    """``config`` as a config file that :func:`load_toml` reads back to the same settings.

    Every setting in :data:`SETTINGS` order, one left unset (None) as a
    comment saying what that means (``# upstream_ca: not set (...)``); arrays of
    tables (the user's ``[[rule]]``\\ s) after every plain key, as TOML requires.
    """
    plain: list[str] = []
    tables: list[str] = []
    for s in SETTINGS:
        if not s.toml:
            continue
        value = s.kind.dump(s, config)
        if value is not None:
            text = s.kind.toml_text(s.name, value)
            (tables if s.kind.toml == "array of tables" else plain).append(text)
        else:
            plain.append(f"# {s.name}: not set ({s.default_text or 'none'})\n")
    return "".join(plain) + "".join(tables)
