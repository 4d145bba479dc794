"""Logging for elbasy: one line per event on stderr, as text or JSON.

Text::

    2026-11-21T23:59:59.123Z INFO elbasy.access 127.0.0.1:50312 CONNECT example.com:443 200
        up=517 down=4312 ms=12.4

(one line, wrapped here).

JSON (``--log-format json``), one object per line::

    {"ts": "2026-11-21T23:59:59.123Z", "level": "INFO", "logger": "elbasy.access",
     "client": "127.0.0.1:50312", "method": "CONNECT", "target": "example.com:443",
     "status": 200, "bytes_up": 517, "bytes_down": 4312, "duration_ms": 12.4}

Other records carry ``msg`` and any structured fields passed with ``extra=``
(``log.warning("upstream slow", extra={"host": h})``), appended as
``host=...`` in text.

Secrets stay out: the access log drops user information from URLs and the
values of query parameters (``/search?q=*&api_key=*``).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from typing import Any

__all__ = ["ACCESS_LOGGER", "configure", "log_access", "reopen_log_file", "startup_banner"]

ACCESS_LOGGER = "elbasy.access"

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

_ACCESS_TEXT = "%s %s %s %d up=%d down=%d ms=%.1f"
_ACCESS_JSON = (
    '{"ts": "%s", "level": "%s", "logger": %s, "client": %s, "method": %s, "target": %s, '
    '"status": %d, "bytes_up": %d, "bytes_down": %d, "duration_ms": %s}'
)
# a paced request's line goes on with its rule, account, cost and wait
_PACED_TEXT = " rule=%s account=%s cost=%g actual=%s wait_ms=%.1f"
_PACED_JSON = ', "rule": %s, "account": %s, "cost": %s, "actual_cost": %s, "wait_ms": %s}'
_json_str = json.encoder.encode_basestring  # str -> JSON string literal, in C
_ACCESS_MARK = "elbasy_access"  # attribute set on access-log records

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName", _ACCESS_MARK}
)

_access = logging.getLogger(ACCESS_LOGGER)


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


class TextFormatter(logging.Formatter):
    """``<ts> <LEVEL> <logger> <message> [key=value ...]``, exceptions below."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {record.name} {record.getMessage()}"
        extras = _extras(record)
        if extras:
            line += "".join(f" {k}={_text_value(v)}" for k, v in extras.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg and structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, _ACCESS_MARK, False) and isinstance(record.args, tuple):
            # The hot path, built by hand: about 3x cheaper than json.dumps of a dict.
            client, method, target, status, bytes_up, bytes_down, ms = record.args[:7]
            line = _ACCESS_JSON % (
                _timestamp(record),
                record.levelname,
                _json_str(record.name),
                _json_str(str(client)),
                _json_str(str(method)),
                _json_str(str(target)),
                status,
                bytes_up,
                bytes_down,
                _json_number(ms),
            )
            if len(record.args) > 7:
                rule, account, cost, actual, wait_ms = record.args[7:]
                line = line[:-1] + _PACED_JSON % (
                    _json_str(str(rule)),
                    _json_str(str(account)),
                    _json_number(cost),
                    _json_number(actual),
                    _json_number(wait_ms),
                )
            return line
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


def _json_number(value: object) -> str:
    """A finite number as JSON, anything else (None, NaN) as null."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "null"
    if isinstance(value, float) and not math.isfinite(value):
        return "null"
    return repr(value)


def _text_value(value: object) -> str:
    text = str(value)
    if text == "" or not text.isprintable() or " " in text or '"' in text:
        return json.dumps(text, ensure_ascii=False)
    return text


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

    Opened with O_APPEND, so the lines of a supervisor and its workers
    writing to the same file never overwrite each other. After a log
    rotation renamed the file, SIGUSR1 reopens it (:func:`reopen_log_file`).
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.stream = open(path, "a", encoding="utf-8")  # noqa: SIM115 (kept open)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + "\n")
            self.stream.flush()
        except Exception:
            self.handleError(record)

    def reopen(self) -> None:
        fresh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open)
        old, self.stream = self.stream, fresh
        old.close()

    def close(self) -> None:
        self.stream.close()
        super().close()


def reopen_log_file() -> bool:
    """Reopen the ``--log-file`` (SIGUSR1, after a rotation); False when logging to stderr.

    An error opening it (a directory gone) is written to stderr and the old
    file is kept.
    """
    for h in logging.getLogger("elbasy").handlers:
        if isinstance(h, _FileHandler):
            try:
                h.reopen()
            except OSError as e:
                sys.stderr.write(f"elbasy: cannot reopen the log file {h.path}: {e}\n")
                return False
            return True
    return False


def configure(level: str, fmt: str, path: str | None = None) -> None:
    """Send the ``elbasy`` loggers to stderr (or to the file ``path``) at ``level``
    in format ``fmt`` (text|json).

    Calling it again replaces the previous setup. Records still propagate to
    the root logger, which elbasy leaves alone. Raises OSError when ``path``
    cannot be opened.
    """
    try:
        numeric = _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r} (one of {', '.join(_LEVELS)})") from None
    formatter: logging.Formatter
    if fmt == "text":
        formatter = TextFormatter()
    elif fmt == "json":
        formatter = JsonFormatter()
    else:
        raise ValueError(f"unknown log format {fmt!r} (text or json)")
    # Neither format shows thread or process names: stop collecting them for
    # every record (a few hundred ns each, once per request).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger("elbasy")
    handler: logging.Handler = _FileHandler(path) if path else _StderrHandler()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler | _FileHandler)]:
        root.removeHandler(old)
        old.close()
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(numeric)


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


def log_access(
    client: str,
    method: str,
    target: str,
    status: int,
    bytes_up: int,
    bytes_down: int,
    duration_ms: float,
    paced: tuple[str, str, float, float | None, float] | None = None,
) -> None:
    """Log one finished tunnel or forwarded request on ``elbasy.access`` at INFO.

    Costs one level check when the access log is disabled. ``target`` is the
    CONNECT authority or the request target; credentials and query values in
    it are not logged. ``paced``: for a request a rule paced, (rule, account
    with its secrets hashed, cost reserved, cost the server reported or
    None, milliseconds it waited for its quota).
    """
    if not _access.isEnabledFor(logging.INFO):
        return
    if "?" in target or "@" in target or not target.isprintable() or " " in target:
        target = _redact_target(target)
    if not method.isprintable() or " " in method:
        method = _clean(method)
    args: tuple[object, ...] = (
        client,
        method,
        target,
        status,
        bytes_up,
        bytes_down,
        round(float(duration_ms), 3),
    )
    text = _ACCESS_TEXT
    if paced is not None:
        rule, account, cost, actual, wait_ms = paced
        args += (rule, account, cost, "-" if actual is None else actual, round(wait_ms, 3))
        text += _PACED_TEXT
    record = logging.LogRecord(ACCESS_LOGGER, logging.INFO, "", 0, text, args, None)
    setattr(record, _ACCESS_MARK, True)
    _access.handle(record)


def startup_banner(version: str, host: str, port: int) -> None:
    """Write ``elbasy <version> listening on <host>:<port>`` to stderr, whatever the log level.

    An IPv6 host is written in brackets (``[::1]:8080``).
    """
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    sys.stderr.write(f"elbasy {version} listening on {where}\n")
    sys.stderr.flush()
