"""Logging for elbasy: one line per event, as text, JSON or logfmt.

Text::

    2026-11-21T23:59:59.123Z INFO elbasy.access 127.0.0.1:50312 GET api.github.com /repos?page=*
        200 up=517 down=4312 ms=12.4 wait_ms=0.0 upstream_ms=11.9 rule=github-rest
        account=github-rest|9f8e7d6c5b4a3921 cost=1 actual=- shed=0 retried=0 worker=0

(one line, wrapped here).

JSON (``--log-format json``), one object per line, every line::

    {"ts": "2026-11-21T23:59:59.123Z", "level": "INFO", "logger": "elbasy.access",
     "client": "127.0.0.1:50312", "method": "GET", "host": "api.github.com",
     "path": "/repos?page=*", "status": 200, "bytes_up": 517, "bytes_down": 4312,
     "duration_ms": 12.4, "wait_ms": 0.0, "upstream_ms": 11.9, "rule": "github-rest",
     "account": "github-rest|9f8e7d6c5b4a3921", "cost": 1, "actual_cost": null,
     "shed": false, "retried": false, "worker": 0}

logfmt (``--log-format logfmt``): the same keys as ``key=value`` pairs, a
value quoted (JSON escapes) only when it has a space, ``=``, a quote, a
backslash or a control character, or is empty; JSON's null is ``null``.

Other records carry ``msg`` and any structured fields passed with ``extra=``
(``log.warning("upstream slow", extra={"host": h})``), appended as
``host=...`` in text and logfmt; a dict field is spread over dotted keys
(``headers.retry-after=2``) there and kept an object in JSON. The startup
banner is a record too (plain ``elbasy <version> listening on <host>:<port>``
in text), written whatever the level.

Secrets stay out: the access log drops user information from URLs and the
values of query parameters (``/search?q=*&api_key=*``). ``--access-log``
sends the access lines to a file of their own, or nowhere.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any

__all__ = [
    "ACCESS_LOGGER",
    "FORMATS",
    "access_log_file",
    "access_on",
    "configure",
    "log_access",
    "reopen_log_file",
    "set_worker",
    "startup_banner",
]

ACCESS_LOGGER = "elbasy.access"
#: the log formats ``configure`` knows
FORMATS = ("text", "json", "logfmt")
#: ``--access-log`` values that are not a path
ACCESS_WITH_LOG = "-"
ACCESS_OFF = "off"

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# An access record's args, in this order (see log_access):
# client, method, host, path, status, bytes_up, bytes_down, duration_ms,
# wait_ms, upstream_ms, rule, account, cost, actual_cost, shed, retried, worker
_ACCESS_TEXT = (
    "%s %s %s %d up=%d down=%d ms=%.1f wait_ms=%.1f upstream_ms=%.1f"
    " rule=%s account=%s cost=%s actual=%s shed=%d retried=%d worker=%d"
)
_ACCESS_JSON = (
    '{"ts": "%s", "level": "%s", "logger": "%s", "client": %s, "method": %s, "host": %s,'
    ' "path": %s, "status": %d, "bytes_up": %d, "bytes_down": %d, "duration_ms": %s,'
    ' "wait_ms": %s, "upstream_ms": %s, "rule": %s, "account": %s, "cost": %s,'
    ' "actual_cost": %s, "shed": %s, "retried": %s, "worker": %d}'
)
_ACCESS_LOGFMT = (
    "ts=%s level=%s logger=%s client=%s method=%s host=%s path=%s status=%d"
    " bytes_up=%d bytes_down=%d duration_ms=%s wait_ms=%s upstream_ms=%s rule=%s"
    " account=%s cost=%s actual_cost=%s shed=%s retried=%s worker=%d"
)
_json_str = json.encoder.encode_basestring  # str -> JSON string literal, in C
_ACCESS_MARK = "elbasy_access"  # attribute set on access-log records
_BOOL = ("false", "true")

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName", _ACCESS_MARK}
)

_access = logging.getLogger(ACCESS_LOGGER)
_START_NS = int(logging._startTime * 1e9)  # type: ignore[attr-defined]
# an access record's attributes but its arguments and times
_ACCESS_DEFAULTS = {
    **logging.LogRecord(ACCESS_LOGGER, logging.INFO, "", 0, "", None, None).__dict__,
    "msg": _ACCESS_TEXT,
    _ACCESS_MARK: True,
}
for _attr in ("args", "created", "msecs", "relativeCreated"):
    del _ACCESS_DEFAULTS[_attr]
for _attr in ("thread", "threadName", "process", "processName", "taskName"):
    _ACCESS_DEFAULTS[_attr] = None  # not collected (see configure); never the importer's
_worker = 0  # this process's worker slot, on every access line


def access_on() -> bool:
    """Whether access lines are written (one level check)."""
    return _access.isEnabledFor(logging.INFO)


def set_worker(slot: int) -> None:
    """The worker slot this process's access lines name (0: a single process)."""
    global _worker
    _worker = slot


_last_second: tuple[int, str] = (-1, "")  # one strftime per second, not per record


def _timestamp(record: logging.LogRecord) -> str:
    global _last_second
    second = int(record.created)
    cached = _last_second  # one read: safe if another thread replaces it
    if cached[0] != second:
        cached = _last_second = (
            second,
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)),
        )
    return f"{cached[1]}.{int(record.msecs):03d}Z"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS}


def _flat(extras: dict[str, Any]) -> list[tuple[str, object]]:
    """Fields as key/value pairs, a dict's items as ``key.item``."""
    out: list[tuple[str, object]] = []
    for k, v in extras.items():
        if isinstance(v, dict):
            out.extend((f"{k}.{ik}", iv) for ik, iv in v.items())
        else:
            out.append((k, v))
    return out


def _args(record: logging.LogRecord) -> Any:
    return record.args


def _is_access(record: logging.LogRecord) -> bool:
    return getattr(record, _ACCESS_MARK, False) and isinstance(record.args, tuple)


class TextFormatter(logging.Formatter):
    """``<ts> <LEVEL> <logger> <message> [key=value ...]``, exceptions below."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {record.name} {record.getMessage()}"
        if _is_access(record):
            return line
        extras = _extras(record)
        if extras:
            line += "".join(f" {k}={_text_value(v)}" for k, v in _flat(extras))
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg and structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        if _is_access(record):
            # The hot path, built by hand: about 3x cheaper than json.dumps of a dict.
            (
                c,
                m,
                host,
                path,
                status,
                up,
                down,
                ms,
                wait,
                upstream,
                rule,
                account,
                cost,
                actual,
                shed,
                retried,
                worker,
            ) = _args(record)
            return _ACCESS_JSON % (
                _timestamp(record),
                record.levelname,
                record.name,
                _json_str(c),
                _json_str(m),
                "null" if host is None else _json_str(host),
                "null" if path is None else _json_str(path),
                status,
                up,
                down,
                repr(ms) if ms - ms == 0 else "null",  # finite: x - x is 0, NaN and inf: NaN
                repr(wait) if wait - wait == 0 else "null",
                repr(upstream) if upstream - upstream == 0 else "null",
                "null" if rule is None else _json_str(rule),
                "null" if account is None else _json_str(account),
                "null" if cost is None else _json_number(cost),
                "null" if actual is None else _json_number(actual),
                _BOOL[shed],
                _BOOL[retried],
                worker,
            )
        obj: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            obj.setdefault(key, value)
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            obj["stack"] = self.formatStack(record.stack_info)
        return json.dumps(obj, ensure_ascii=False, default=str)


class LogfmtFormatter(logging.Formatter):
    """``key=value`` pairs: ts, level, logger, msg and structured fields; one line each
    (an exception's traceback is the value of ``exc``)."""

    def format(self, record: logging.LogRecord) -> str:
        if _is_access(record):
            (
                c,
                m,
                host,
                path,
                status,
                up,
                down,
                ms,
                wait,
                upstream,
                rule,
                account,
                cost,
                actual,
                shed,
                retried,
                worker,
            ) = _args(record)
            return _ACCESS_LOGFMT % (
                _timestamp(record),
                record.levelname,
                record.name,
                _logfmt_value(c),
                _logfmt_value(m),
                _logfmt_value(host),
                _logfmt_value(path),
                status,
                up,
                down,
                repr(ms) if ms - ms == 0 else "null",
                repr(wait) if wait - wait == 0 else "null",
                repr(upstream) if upstream - upstream == 0 else "null",
                "null" if rule is None else _logfmt_value(rule),
                "null" if account is None else _logfmt_value(account),
                "null" if cost is None else _json_number(cost),
                "null" if actual is None else _json_number(actual),
                _BOOL[shed],
                _BOOL[retried],
                worker,
            )
        fields: list[tuple[str, object]] = [
            ("ts", _timestamp(record)),
            ("level", record.levelname),
            ("logger", record.name),
            ("msg", record.getMessage()),
        ]
        taken = {"ts", "level", "logger", "msg"}
        fields += [(k, v) for k, v in _flat(_extras(record)) if k not in taken]
        if record.exc_info:
            fields.append(("exc", self.formatException(record.exc_info)))
        if record.stack_info:
            fields.append(("stack", self.formatStack(record.stack_info)))
        return " ".join(f"{_logfmt_key(k)}={_logfmt_value(v)}" for k, v in fields)


def _json_number(value: object) -> str:
    """A finite number as JSON, anything else (None, NaN) as null."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "null"
    if isinstance(value, float) and not math.isfinite(value):
        return "null"
    return repr(value)


def _json_or_null(value: str | None) -> str:
    return "null" if value is None else _json_str(value)


def _text_value(value: object) -> str:
    text = str(value)
    if text == "" or not text.isprintable() or " " in text or '"' in text:
        return json.dumps(text, ensure_ascii=False)
    return text


def _logfmt_value(value: object) -> str:
    """A logfmt value: bare when it can be, else a quoted JSON string; None is null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return _BOOL[value]
    if isinstance(value, float):
        return _json_number(value)
    text = value if isinstance(value, str) else str(value)
    if (
        text
        and text.isprintable()
        and " " not in text
        and "=" not in text
        and '"' not in text
        and "\\" not in text
    ):
        return text
    return _json_str(text)


def _logfmt_key(key: str) -> str:
    """A key has no space, '=' or quote: anything else becomes '_'."""
    if key.isprintable() and not any(c in key for c in ' ="\\'):
        return key or "_"
    return "".join(c if c.isprintable() and c not in ' ="\\' else "_" for c in key)


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (test harnesses swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


class _FileHandler(logging.Handler):
    """Appends to a log file; :meth:`reopen` starts a new one at the same path.

    Opened with O_APPEND and written with one write() per line, so the lines
    of a supervisor and its workers writing to the same file never overwrite
    or split each other. After a log rotation renamed the file, SIGUSR1
    reopens it (:func:`reopen_log_file`).
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.fd = _open_append(path)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "replace")
            while data:
                data = data[os.write(self.fd, data) :]
        except Exception:
            self.handleError(record)

    def reopen(self) -> None:
        # the new file takes the old one's fd number: a line being written
        # when the signal came goes to one file or the other, never to a closed fd
        fresh = _open_append(self.path)
        try:
            os.dup2(fresh, self.fd, inheritable=False)
        finally:
            os.close(fresh)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        super().close()


def _open_append(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _file_handlers() -> list[_FileHandler]:
    return [
        h
        for name in ("elbasy", ACCESS_LOGGER)
        for h in logging.getLogger(name).handlers
        if isinstance(h, _FileHandler)
    ]


def access_log_file(access: str | None) -> str | None:
    """The file an ``--access-log`` value names, or None (``-``, ``off``)."""
    return None if access in (None, ACCESS_WITH_LOG, ACCESS_OFF) else access


def reopen_log_file() -> bool:
    """Reopen the ``--log-file`` and the ``--access-log`` file (SIGUSR1, after a
    rotation); False when there is none, or one could not be reopened.

    An error opening one (a directory gone) is written to stderr and its
    old file is kept.
    """
    handlers = _file_handlers()
    ok = bool(handlers)
    for h in handlers:
        try:
            h.reopen()
        except OSError as e:
            sys.stderr.write(f"elbasy: cannot reopen the log file {h.path}: {e}\n")
            ok = False
    return ok


_FORMATTERS: dict[str, type[logging.Formatter]] = {
    "text": TextFormatter,
    "json": JsonFormatter,
    "logfmt": LogfmtFormatter,
}


def configure(
    level: str, fmt: str, path: str | None = None, access: str | None = ACCESS_WITH_LOG
) -> None:
    """Send the ``elbasy`` loggers to stderr (or to the file ``path``) at ``level``
    in format ``fmt`` (text|json|logfmt).

    ``access`` (``--access-log``): ``-`` or None, the access lines go with
    the others (at ``level``); ``off``, nowhere; a path, to that file alone,
    in the same format, whatever ``level``.

    Calling it again replaces the previous setup. Records still propagate to
    the root logger, which elbasy leaves alone (access lines sent to a file
    do not). Raises OSError when a file cannot be opened, ValueError for an
    unknown level or format.
    """
    try:
        numeric = _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r} (one of {', '.join(_LEVELS)})") from None
    try:
        formatter_type = _FORMATTERS[fmt]
    except KeyError:
        raise ValueError(f"unknown log format {fmt!r} ({', '.join(FORMATS)})") from None
    # No format shows thread or process names: stop collecting them for
    # every record (a few hundred ns each, once per request).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler: logging.Handler = _FileHandler(path) if path else _StderrHandler()
    access_handler: logging.Handler | None = None
    access_path = access_log_file(access)
    if access_path is not None:
        try:
            access_handler = _FileHandler(access_path)
        except OSError:
            handler.close()
            raise
    root = logging.getLogger("elbasy")
    for logger in (root, _access):
        for old in [h for h in logger.handlers if isinstance(h, _StderrHandler | _FileHandler)]:
            logger.removeHandler(old)
            old.close()
    handler.setFormatter(formatter_type())
    root.addHandler(handler)
    root.setLevel(numeric)
    _access.propagate = access_handler is None
    if access == ACCESS_OFF:
        _access.setLevel(logging.CRITICAL + 1)  # one level check per request, then nothing
    elif access_handler is not None:
        access_handler.setFormatter(formatter_type())
        _access.addHandler(access_handler)
        _access.setLevel(logging.INFO)
    else:
        _access.setLevel(logging.NOTSET)


# --------------------------------------------------------------------------- access log


def _redact_target(target: str) -> str:
    """Drop URL user information and query values; escape what would break a log line."""
    if "@" in target:
        scheme, sep, rest = target.partition("://")
        if sep:
            authority, slash, path = rest.partition("/")
            if "@" in authority:
                target = f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"
    if "?" in target:
        head, _, query = target.partition("?")
        query = query.partition("#")[0]
        names = [part.partition("=")[0] for part in query.split("&") if part]
        target = head + "?" + "&".join(f"{name}=*" for name in names)
    return _clean(target)


def _clean(text: str) -> str:
    """Keep one log line one line: escape control characters and spaces."""
    if text.isprintable() and " " not in text:
        return text
    out = []
    for c in text:
        if c == " ":
            out.append("%20")
        elif c.isprintable():
            out.append(c)
        else:
            out.append(c.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def _host_path(method: str, target: str) -> tuple[str | None, str | None]:
    """A (redacted) target as its host (the authority) and its path (with the query).

    A CONNECT's target is its host, with no path; an origin-form target
    (elbasy's own pages) has no host; ``-`` (a head that did not parse)
    neither.
    """
    if method == "CONNECT":
        return target, None
    if target.startswith("/") or target == "*":
        return None, target
    _, sep, rest = target.partition("://")
    if not sep:
        return None, None if target == "-" else target
    cut = rest.find("/")
    if "?" in rest:  # a query right after the authority ("http://h?x=*")
        q = rest.find("?")
        cut = q if cut < 0 or q < cut else cut
    if cut < 0:
        return rest, "/"
    path = rest[cut:]
    return rest[:cut], path if path[0] == "/" else "/" + path


def log_access(
    client: str,
    method: str,
    target: str,
    status: int,
    bytes_up: int,
    bytes_down: int,
    duration_ms: float,
    wait_ms: float = 0.0,
    upstream_ms: float = 0.0,
    paced: tuple[str, str, float, float | None] | None = None,
    shed: bool = False,
    retried: bool = False,
) -> None:
    """Log one finished tunnel or request on ``elbasy.access`` at INFO.

    Costs one level check when the access log is off. ``target`` is the
    CONNECT authority or the request target, logged as its host and path;
    credentials and query values in it are not logged. ``wait_ms``: how
    long it waited for its quota; ``upstream_ms``: from its departure to its
    answer's head (a tunnel: its whole life). ``paced``: for a request a
    rule paced, (rule, account with its secrets hashed, cost reserved, cost
    the server reported or None). ``shed``: elbasy answered it itself for
    its quota (429, or 503 when the quota table is full); ``retried``: it
    was sent again after the server refused it.
    """
    if not _access.isEnabledFor(logging.INFO):
        return
    if "?" in target or "@" in target or not target.isprintable() or " " in target:
        target = _redact_target(target)
    if not method.isprintable() or " " in method:
        method = _clean(method)
    host, path = _host_path(method, target)
    if paced is None:
        rule = account = None
        cost: float | None = None
        actual: float | None = None
    else:
        rule, account, cost, actual = paced
    args = (
        client,
        method,
        host,
        path,
        status,
        bytes_up,
        bytes_down,
        round(duration_ms, 3),
        round(wait_ms, 3),
        round(upstream_ms, 3),
        rule,
        account,
        cost,
        actual,
        shed,
        retried,
        _worker,
    )
    _access.handle(_AccessRecord(args))


class _AccessRecord(logging.LogRecord):
    """An access line; its message is the text form: the host and path as one
    (``api.github.com/repos``, ``/healthz``), "-" for what it lacks."""

    def __init__(self, args: tuple[object, ...]) -> None:
        # what LogRecord's own __init__ sets, without its work for a caller's
        # file, line and thread (a third of an access line's cost)
        ns = time.time_ns()
        d = self.__dict__
        d.update(_ACCESS_DEFAULTS)
        d["args"] = args
        d["created"] = ns / 1e9
        d["msecs"] = (ns // 1_000_000) % 1000 + 0.0
        d["relativeCreated"] = (ns - _START_NS) / 1e6

    def getMessage(self) -> str:  # noqa: N802 (logging's name)
        a: Any = self.args
        where = (a[2] or "") + (a[3] or "")
        return _ACCESS_TEXT % (
            *a[:2],
            where or "-",
            *a[4:10],
            *("-" if v is None else v for v in a[10:14]),
            *a[14:],
        )


def startup_banner(version: str, host: str, port: int) -> None:
    """Log ``elbasy <version> listening on <host>:<port>``, whatever the log level.

    On stderr in text, the line alone (scripts read it). In JSON and logfmt
    a record of that format, with ``version``, ``host`` and ``port`` as
    fields too. With ``--log-file`` the record goes to the file and the
    plain line to stderr still. An IPv6 host is written in brackets
    (``[::1]:8080``).
    """
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    _announce(f"elbasy {version} listening on {where}", version=version, host=host, port=port)


def startup_next(url: str, ca_file: str | None) -> None:
    """After the listening line, whatever the log level: the line a user runs
    next (``export HTTPS_PROXY=...`` with the real address) and, when elbasy
    intercepts, where its CA is and how to trust it."""
    _announce(f"next: export HTTPS_PROXY={url} HTTP_PROXY={url}", proxy_url=url)
    if ca_file is not None:
        _announce(
            f"clients must trust {ca_file} (also at {url}/ca.pem): elbasy ca trust-help",
            ca_file=ca_file,
        )


def reverse_banner(host: str, port: int, origin: str) -> None:
    """Log ``reverse proxy on <host>:<port> to <origin>`` for one --reverse listener,
    whatever the log level, as :func:`startup_banner` logs (its port: port 0's choice)."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    _announce(f"reverse proxy on {where} to {origin}", host=host, port=port, origin=origin)


def transparent_banner(host: str, port: int) -> None:
    """Log ``transparent listener on <host>:<port>`` for one --transparent listener,
    whatever the log level, as :func:`startup_banner` logs (its port: port 0's choice)."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    _announce(f"transparent listener on {where}", host=host, port=port)


def tls_listener_banner(host: str, port: int, cert_file: str) -> None:
    """Log ``TLS proxy on <host>:<port>`` for --listen-tls, with what its clients set
    and the certificate they trust, whatever the log level."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    _announce(
        f"TLS proxy on {where}: clients set HTTPS_PROXY=https://{where} and trust {cert_file}",
        host=host,
        port=port,
    )


def _announce(message: str, **fields: object) -> None:
    """One startup line: on stderr alone in text (scripts read it); in JSON and
    logfmt a record of that format with ``fields``; with --log-file the record
    goes to the file and the plain line to stderr still."""
    handler = next(
        (
            h
            for h in logging.getLogger("elbasy").handlers
            if isinstance(h, _StderrHandler | _FileHandler)
        ),
        None,
    )
    text = handler is None or isinstance(handler.formatter, TextFormatter)
    if handler is None or isinstance(handler, _FileHandler) or text:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    if handler is None or (text and isinstance(handler, _StderrHandler)):
        return
    record = logging.LogRecord("elbasy", logging.INFO, "", 0, message, None, None)
    if not text:
        record.__dict__.update(fields)
    handler.handle(record)  # the handler's, not the logger's: past the level
