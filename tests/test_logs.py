"""elbasy.logs: text, JSON and logfmt lines, the access log, the startup banner; and the
lines of a real elbasy process."""

from __future__ import annotations

import calendar
import http.client
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import origins
import pytest
import test_pacing
from conftest import Proxy
from test_pacing import burst, elbasy_for, session

from elbasy import logs
from elbasy.logs import configure, log_access, startup_banner

TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
ACCESS_KEYS = {
    "client",
    "method",
    "host",
    "path",
    "status",
    "bytes_up",
    "bytes_down",
    "duration_ms",
    "wait_ms",
    "upstream_ms",
    "rule",
    "account",
    "cost",
    "actual_cost",
    "shed",
    "retried",
    "worker",
}
# a logfmt pair: a bare value, or a quoted one with JSON escapes
LOGFMT_PAIR = re.compile(r'([^\s="]+)=("(?:[^"\\]|\\.)*"|[^\s="]*)(?:\s+|$)')


def parse_logfmt(line: str, typed: bool = False) -> dict[str, Any]:
    """A logfmt line's pairs; the whole line must be pairs. ``typed``: a bare
    null, true, false or number as JSON's."""
    out: dict[str, Any] = {}
    at = 0
    while at < len(line):
        m = LOGFMT_PAIR.match(line, at)
        assert m, f"not logfmt at {at}: {line!r}"
        key, value = m.groups()
        if value.startswith('"'):
            out[key] = json.loads(value)
        elif typed and re.fullmatch(r"null|true|false|-?\d+(\.\d+)?(e-?\d+)?", value):
            out[key] = json.loads(value)
        else:
            out[key] = value
        at = m.end()
    return out


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger("elbasy")
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err.splitlines()


def text_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line written, with its timestamp checked and removed."""
    (line,) = lines(capsys)
    ts, rest = line.split(" ", 1)
    assert re.fullmatch(TS, ts), line
    return rest


def json_line(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    (line,) = lines(capsys)
    obj = json.loads(line)
    assert isinstance(obj, dict)
    assert re.fullmatch(TS, obj.pop("ts"))
    return obj


# --------------------------------------------------------------------------- access log


def test_access_text(capsys: pytest.CaptureFixture[str]) -> None:
    configure("info", "text")
    log_access("127.0.0.1:50312", "CONNECT", "example.com:443", 200, 517, 4312, 12.44, 0.0, 12.44)
    assert text_line(capsys) == (
        "INFO elbasy.access 127.0.0.1:50312 CONNECT example.com:443 200 up=517 down=4312"
        " ms=12.4 wait_ms=0.0 upstream_ms=12.4 rule=- account=- cost=- actual=- shed=0"
        " retried=0 worker=0"
    )


def test_access_json(capsys: pytest.CaptureFixture[str]) -> None:
    configure("info", "json")
    log_access("[::1]:5000", "GET", "http://example.com/a/b", 404, 80, 1200, 3.25, 0.0, 2.5)
    assert json_line(capsys) == {
        "level": "INFO",
        "logger": "elbasy.access",
        "client": "[::1]:5000",
        "method": "GET",
        "host": "example.com",
        "path": "/a/b",
        "status": 404,
        "bytes_up": 80,
        "bytes_down": 1200,
        "duration_ms": 3.25,
        "wait_ms": 0.0,
        "upstream_ms": 2.5,
        "rule": None,
        "account": None,
        "cost": None,
        "actual_cost": None,
        "shed": False,
        "retried": False,
        "worker": 0,
    }


def test_access_logfmt_quotes_only_what_needs_it(capsys: pytest.CaptureFixture[str]) -> None:
    configure("info", "logfmt")
    log_access('c "1"', "GET", "http://example.com/a?x=1", 200, 1, 2, 3.0)
    (line,) = lines(capsys)
    fields = parse_logfmt(line)
    assert re.fullmatch(TS, fields.pop("ts"))
    assert fields["client"] == 'c "1"' and fields["path"] == "/a?x=*"
    assert ' path="/a?x=*" ' in line and " host=example.com " in line
    assert (fields["status"], fields["rule"], fields["shed"], fields["worker"]) == (
        "200",
        "null",
        "false",
        "0",
    )


def test_access_paced_request_names_its_rule_account_costs_and_wait(
    capsys: pytest.CaptureFixture[str],
) -> None:
    paced = (
        "shopify-admin-graphql",
        "shopify-admin-graphql|acme|1f2e3d4c5b6a7988",
        882,
        52.0,
    )
    configure("info", "text")
    log_access("c", "POST", "https://acme.myshopify.com/g", 200, 80, 900, 510.0, 503.81, 6.0, paced)
    line = capsys.readouterr().err.strip()
    assert line.endswith(
        " POST acme.myshopify.com/g 200 up=80 down=900 ms=510.0 wait_ms=503.8 upstream_ms=6.0"
        " rule=shopify-admin-graphql account=shopify-admin-graphql|acme|1f2e3d4c5b6a7988"
        " cost=882 actual=52.0 shed=0 retried=0 worker=0"
    ), line
    configure("info", "json")
    logs.set_worker(3)
    try:
        log_access(
            "c", "POST", "https://acme.myshopify.com/g", 200, 80, 900, 510.0, 503.81, 6.0,
            paced, False, True,
        )  # fmt: skip
    finally:
        logs.set_worker(0)
    obj = json_line(capsys)
    assert set(obj) == ACCESS_KEYS | {"level", "logger"}
    assert (obj["rule"], obj["cost"], obj["actual_cost"], obj["wait_ms"]) == (
        "shopify-admin-graphql",
        882,
        52.0,
        503.81,
    )
    assert (obj["retried"], obj["shed"], obj["worker"], obj["host"]) == (
        True,
        False,
        3,
        "acme.myshopify.com",
    )
    # not answered yet (a client that left while held): no actual cost
    log_access("c", "POST", "/g", 499, 0, 0, 0.0, 12.5, 0.0, paced[:3] + (None,))
    assert json_line(capsys)["actual_cost"] is None
    log_access("c", "GET", "/g", 429, 0, 90, 0.0, 0.0, 0.0, paced, True)
    assert json_line(capsys)["shed"] is True


def test_access_json_has_exactly_the_contract_keys(capsys: pytest.CaptureFixture[str]) -> None:
    configure("debug", "json")
    log_access("c", "CONNECT", "h:1", 502, 0, 0, 0.0)
    obj = json_line(capsys)
    assert set(obj) == ACCESS_KEYS | {"level", "logger"}
    assert (obj["host"], obj["path"]) == ("h:1", None)


@pytest.mark.parametrize(
    ("method", "target", "host", "path"),
    [
        ("CONNECT", "example.com:443", "example.com:443", None),
        ("GET", "/healthz", None, "/healthz"),
        ("GET", "-", None, None),
        ("GET", "http://example.com", "example.com", "/"),
        ("GET", "http://example.com?x=1", "example.com", "/?x=*"),
        ("GET", "https://h:8443/a/b?c", "h:8443", "/a/b?c=*"),
    ],
)
def test_access_host_and_path(
    capsys: pytest.CaptureFixture[str], method: str, target: str, host: str, path: str
) -> None:
    configure("info", "json")
    log_access("c", method, target, 200, 0, 0, 0.0)
    obj = json_line(capsys)
    assert (obj["host"], obj["path"]) == (host, path)


def test_access_json_escapes_and_odd_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    configure("info", "json")
    log_access('c"\\', "GET", '/\u00e9"\t', 200, 0, 0, float("nan"))
    obj = json_line(capsys)
    assert (obj["client"], obj["path"], obj["duration_ms"]) == ('c"\\', '/\u00e9"\\t', None)
    log_access("c", "GET", "/", 200, 0, 0, 1e-05)
    assert json_line(capsys)["duration_ms"] == 0.0  # rounded to microseconds
    log_access("c", "GET", "/", 200, 0, 0, 7, float("inf"))
    obj = json_line(capsys)
    assert (obj["duration_ms"], obj["wait_ms"]) == (7, None)


def test_access_disabled_does_no_work(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("a record was built while the access log is off")

    monkeypatch.setattr(logs, "_AccessRecord", boom)
    monkeypatch.setattr(logs, "_redact_target", boom)
    for level, access in (("warning", "-"), ("debug", "off")):
        configure(level, "text", None, access)
        assert not logs.access_on()
        log_access("c", "GET", "http://h/?token=secret", 200, 1, 2, 3.0)
    logging.getLogger("elbasy.server").warning("others still go")
    assert [line.split(" ", 1)[1] for line in lines(capsys)] == [
        "WARNING elbasy.server others still go"
    ]


def test_access_log_file_of_its_own(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    configure("warning", "json", None, str(path))  # the file takes them whatever the level
    log_access("c", "GET", "/a", 200, 1, 2, 3.0)
    logging.getLogger("elbasy.server").warning("not an access line")
    (record,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert record["path"] == "/a"
    (other,) = lines(capsys)
    assert json.loads(other)["msg"] == "not an access line"
    path.rename(tmp_path / "access.log.1")
    assert logs.reopen_log_file()
    log_access("c", "GET", "/b", 200, 1, 2, 3.0)
    assert json.loads(path.read_text())["path"] == "/b"
    configure("info", "text")  # back with the others: the file is closed
    log_access("c", "GET", "/c", 200, 1, 2, 3.0)
    assert "/c" in text_line(capsys)
    assert "/c" not in path.read_text()


def test_access_log_file_that_cannot_be_opened(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        configure("info", "text", None, str(tmp_path / "missing" / "access.log"))


def test_access_logger_can_be_silenced_alone(capsys: pytest.CaptureFixture[str]) -> None:
    configure("info", "text")
    logging.getLogger("elbasy.access").setLevel(logging.WARNING)
    try:
        log_access("c", "GET", "/", 200, 1, 2, 3.0)
        logging.getLogger("elbasy.server").info("still here")
    finally:
        logging.getLogger("elbasy.access").setLevel(logging.NOTSET)
    assert text_line(capsys) == "INFO elbasy.server still here"


@pytest.mark.parametrize(
    ("target", "logged"),
    [
        ("http://user:pw@example.com/x", "http://example.com/x"),
        ("http://user:pw@example.com", "http://example.com/"),
        ("http://example.com/x?api_key=s3cret&page=2", "http://example.com/x?api_key=*&page=*"),
        ("http://example.com/x?flag&token=abc#frag", "http://example.com/x?flag=*&token=*"),
        ("/search?q=a%20b", "/search?q=*"),
        ("http://example.com/a@b", "http://example.com/a@b"),  # '@' in the path is no userinfo
    ],
)
def test_access_target_secrets_are_not_logged(
    capsys: pytest.CaptureFixture[str], target: str, logged: str
) -> None:
    configure("info", "json")
    log_access("c", "GET", target, 200, 0, 0, 1.0)
    obj = json_line(capsys)
    expected = logged.partition("://")[2] if "://" in logged else logged
    assert (obj["host"] or "") + (obj["path"] or "") == expected
    assert "s3cret" not in json.dumps(obj) and "pw" not in json.dumps(obj)


def test_access_text_stays_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure("info", "text")
    log_access("c", "G\nET", "/a b\r\nX-Injected: 1", 400, 0, 0, 0.0)
    assert text_line(capsys).startswith(
        "INFO elbasy.access c G\\nET /a%20b\\r\\nX-Injected:%201 400 up=0 down=0 ms=0.0 "
    )


# --------------------------------------------------------------------------- other records


def test_text_record_with_fields(capsys: pytest.CaptureFixture[str]) -> None:
    configure("info", "text")
    logging.getLogger("elbasy.server").warning(
        "upstream %s slow", "h:443", extra={"host": "h", "ms": 1500, "why": "a b"}
    )
    assert text_line(capsys) == 'WARNING elbasy.server upstream h:443 slow host=h ms=1500 why="a b"'


def test_json_record_with_fields(capsys: pytest.CaptureFixture[str]) -> None:
    configure("info", "json")
    logging.getLogger("elbasy.quota").error(
        "429 from %s", "api", extra={"account": "shop-1", "retry_after": 2.0, "obj": object}
    )
    obj = json_line(capsys)
    assert obj == {
        "level": "ERROR",
        "logger": "elbasy.quota",
        "msg": "429 from api",
        "account": "shop-1",
        "retry_after": 2.0,
        "obj": "<class 'object'>",
    }


def test_exceptions(capsys: pytest.CaptureFixture[str]) -> None:
    configure("info", "json")
    log = logging.getLogger("elbasy.server")
    try:
        raise RuntimeError("kaput")
    except RuntimeError:
        log.exception("worker failed")
    obj = json_line(capsys)
    assert obj["msg"] == "worker failed"
    assert obj["exc"].startswith("Traceback") and "RuntimeError: kaput" in obj["exc"]
    configure("info", "text")
    try:
        raise RuntimeError("kaput")
    except RuntimeError:
        log.exception("worker failed")
    out = lines(capsys)
    assert re.fullmatch(TS + " ERROR elbasy.server worker failed", out[0])
    assert out[1] == "Traceback (most recent call last):"
    assert out[-1] == "RuntimeError: kaput"


def test_level_filters(capsys: pytest.CaptureFixture[str]) -> None:
    configure("warning", "text")
    log = logging.getLogger("elbasy.x")
    log.debug("d")
    log.info("i")
    log.warning("w")
    assert text_line(capsys) == "WARNING elbasy.x w"
    configure("DEBUG", "text")
    log.debug("d")
    assert text_line(capsys) == "DEBUG elbasy.x d"


def test_configure_twice_replaces_the_handler(capsys: pytest.CaptureFixture[str]) -> None:
    configure("info", "text")
    configure("info", "json")
    logging.getLogger("elbasy").info("once")
    assert json_line(capsys) == {"level": "INFO", "logger": "elbasy", "msg": "once"}


def test_other_loggers_untouched(capsys: pytest.CaptureFixture[str]) -> None:
    configure("debug", "text")
    logging.getLogger("somelib").warning("not ours")
    assert not any("not ours" in line for line in lines(capsys))


@pytest.mark.parametrize(("level", "fmt"), [("trace", "text"), ("info", "xml")])
def test_configure_rejects_unknown(level: str, fmt: str) -> None:
    with pytest.raises(ValueError, match="unknown log"):
        configure(level, fmt)


def test_timestamp_is_utc_with_milliseconds() -> None:
    record = logging.LogRecord("elbasy", logging.INFO, "", 0, "m", None, None)
    record.created = calendar.timegm((2026, 11, 21, 23, 59, 59)) + 0.123
    record.msecs = 123.0
    assert logs.TextFormatter().format(record) == "2026-11-21T23:59:59.123Z INFO elbasy m"
    assert json.loads(logs.JsonFormatter().format(record))["ts"] == "2026-11-21T23:59:59.123Z"


# --------------------------------------------------------------------------- banner


def test_startup_banner_ignores_the_log_level(capsys: pytest.CaptureFixture[str]) -> None:
    configure("error", "text")
    startup_banner("1.2.3", "127.0.0.1", 40123)
    startup_banner("1.2.3", "::1", 8080)
    assert lines(capsys) == [
        "elbasy 1.2.3 listening on 127.0.0.1:40123",
        "elbasy 1.2.3 listening on [::1]:8080",
    ]


def test_startup_banner_is_a_record_in_json_and_logfmt(capsys: pytest.CaptureFixture[str]) -> None:
    configure("error", "json")
    startup_banner("1.2.3", "::1", 8080)
    assert json_line(capsys) == {
        "level": "INFO",
        "logger": "elbasy",
        "msg": "elbasy 1.2.3 listening on [::1]:8080",
        "version": "1.2.3",
        "host": "::1",
        "port": 8080,
    }
    configure("error", "logfmt")
    startup_banner("1.2.3", "127.0.0.1", 80)
    (line,) = lines(capsys)
    fields = parse_logfmt(line)
    assert fields["msg"] == "elbasy 1.2.3 listening on 127.0.0.1:80"
    assert (fields["level"], fields["host"], fields["port"]) == ("INFO", "127.0.0.1", "80")


def test_startup_banner_with_a_log_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    log = tmp_path / "elbasy.log"
    configure("error", "json", str(log))
    startup_banner("1.2.3", "127.0.0.1", 80)
    assert lines(capsys) == ["elbasy 1.2.3 listening on 127.0.0.1:80"]  # still told on stderr
    assert json.loads(log.read_text())["port"] == 80


# --------------------------------------------------------------------------- logfmt


def test_logfmt_record_fields_and_exceptions(capsys: pytest.CaptureFixture[str]) -> None:
    configure("info", "logfmt")
    log = logging.getLogger("elbasy.pacing")
    log.warning(
        "refused %s",
        "x",
        extra={"rule": "r", "empty": "", "headers": {"retry-after": "2", "x-limit": "40/40"}},
    )
    try:
        raise RuntimeError("kaput\nline two")
    except RuntimeError:
        log.exception("failed")
    first, second = lines(capsys)  # a traceback stays on its record's line
    fields = parse_logfmt(first)
    assert (fields["msg"], fields["rule"], fields["empty"]) == ("refused x", "r", "")
    assert (fields["headers.retry-after"], fields["headers.x-limit"]) == ("2", "40/40")
    fields = parse_logfmt(second)
    assert fields["level"] == "ERROR" and "RuntimeError: kaput" in fields["exc"]


def test_text_spreads_a_dict_field(capsys: pytest.CaptureFixture[str]) -> None:
    configure("info", "text")
    logging.getLogger("elbasy.pacing").warning("w", extra={"headers": {"retry-after": "2"}})
    assert text_line(capsys) == "WARNING elbasy.pacing w headers.retry-after=2"


# --------------------------------------------------------------------------- elbasy as a process


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "20", *args],
        capture_output=True,
        env=env,
        timeout=30,
    )


def records(lines: list[str], fmt: str) -> list[dict[str, Any]]:
    """Every line as a record of ``fmt``; a line that is not one fails the test."""
    out = []
    for line in lines:
        line = line.rstrip("\n")
        rec = json.loads(line) if fmt == "json" else parse_logfmt(line, typed=True)
        assert isinstance(rec, dict) and {"ts", "level", "logger"} <= set(rec), line
        out.append(rec)
    return out


def access_of(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in recs if r["logger"] == "elbasy.access"]


def wait_for(cond: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := cond()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


def stop(p: Proxy) -> None:
    p.stopped_by_test = True
    assert p.stop() == 0


@pytest.mark.parametrize("fmt", ["json", "logfmt"])
def test_every_line_is_a_record_banner_included(
    proxy: Callable[..., Proxy],
    http_origin: origins.HTTPOrigin,
    tls_origin: origins.HTTPOrigin,
    test_ca: origins.TestCA,
    fmt: str,
) -> None:
    p = proxy("--log-format", fmt, "--log-level", "debug")
    r = curl(
        "-x", p.url, f"http://user:pw@{http_origin.hostport}/echo?token=s3cret&n=1", "-d", "12345"
    )
    assert r.returncode == 0, r.stderr
    r = curl("-x", p.url, "--cacert", str(test_ca.path), f"{tls_origin.base}/hello")
    assert r.returncode == 0, r.stderr
    assert wait_for(lambda: len(access_of(records(p.stderr_lines, fmt))) >= 2), p.stderr
    stop(p)  # the lines of a stop are records too
    recs = records(p.stderr_lines, fmt)
    (banner,) = [r for r in recs if "listening on" in r["msg" if "msg" in r else "ts"]]
    assert banner["msg"] == f"elbasy {p.version} listening on 127.0.0.1:{p.port}"
    assert (str(banner["version"]), banner["host"], banner["port"]) == (
        p.version,
        "127.0.0.1",
        p.port,
    )
    assert any(r["level"] == "DEBUG" for r in recs)  # "worker 0 started"
    (fwd,) = [a for a in access_of(recs) if a["method"] == "POST"]
    (tun,) = [a for a in access_of(recs) if a["method"] == "CONNECT"]
    assert set(fwd) == ACCESS_KEYS | {"ts", "level", "logger"}
    assert (fwd["host"], fwd["path"]) == (http_origin.hostport, "/echo?token=*&n=*")
    assert "s3cret" not in p.stderr and "pw@" not in p.stderr
    assert fwd["client"].startswith("127.0.0.1:")
    assert (fwd["status"], fwd["worker"], fwd["shed"], fwd["retried"]) == (200, 0, False, False)
    assert fwd["bytes_up"] >= 5 and fwd["bytes_down"] >= 5
    # (the loop reads its clock once a turn: the two clocks may differ by a turn)
    assert 0 < fwd["upstream_ms"] <= fwd["duration_ms"] + 5
    assert fwd["wait_ms"] == 0
    assert fwd["rule"] is fwd["account"] is None  # no rule covers the origin
    assert (tun["host"], tun["path"]) == (tls_origin.hostport, None)
    assert tun["bytes_up"] > 0 and tun["bytes_down"] > 0
    # a tunnel has no finer clock: its upstream time is its whole life
    assert tun["upstream_ms"] == tun["duration_ms"] > 0


def test_text_banner_is_the_plain_line(proxy: Callable[..., Proxy]) -> None:
    p = proxy("--log-level", "error")  # the banner is written whatever the level
    (banner,) = [ln for ln in p.stderr_lines if "listening on" in ln]
    assert banner == f"elbasy {p.version} listening on 127.0.0.1:{p.port}\n"


def test_access_log_file_of_its_own_reopened_on_sigusr1(
    proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    access = tmp_path / "access.log"
    p = proxy("--access-log", str(access), "--workers", "2", "--log-format", "json")
    answered: dict[str, int] = {}  # client address -> the worker that said it answered

    def healthz() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)
        try:
            conn.request("GET", "/healthz", headers={"Connection": "close"})
            assert conn.sock is not None
            client = f"127.0.0.1:{conn.sock.getsockname()[1]}"
            answered[client] = json.loads(conn.getresponse().read())["worker"]
        finally:
            conn.close()

    def file_lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in access.read_text().splitlines()]

    def until_both_workers_wrote() -> list[dict[str, Any]]:
        """Ask until both workers answered, each time until its line is in the file."""
        deadline = time.monotonic() + 10
        while True:
            healthz()
            written = (
                wait_for(lambda: access.exists() and len(file_lines()) == len(answered))
                and file_lines()
            )
            if not written or {r["worker"] for r in written} == {0, 1}:
                return written or []
            if time.monotonic() > deadline:
                return written

    before = until_both_workers_wrote()
    # each line names the worker that answered its client
    assert all(r["worker"] == answered[r["client"]] for r in before), (before, answered)
    assert {r["worker"] for r in before} == {0, 1}
    assert all(r["logger"] == "elbasy.access" and r["path"] == "/healthz" for r in before)
    rotated = tmp_path / "access.log.1"
    access.rename(rotated)
    answered.clear()
    p.proc.send_signal(signal.SIGUSR1)
    assert wait_for(lambda: "log files reopened" in p.stderr)
    time.sleep(0.2)  # the workers' signal handlers ran
    fresh = until_both_workers_wrote()  # every worker writes to the fresh file now
    assert {r["worker"] for r in fresh} == {0, 1}
    assert all(r["worker"] == answered[r["client"]] for r in fresh)
    assert len(rotated.read_text().splitlines()) == len(before)  # nothing more there
    assert not access_of(records(p.stderr_lines, "json"))  # none went to the main log


def test_access_log_off(proxy: Callable[..., Proxy], http_origin: origins.HTTPOrigin) -> None:
    p = proxy("--access-log", "off", "--log-format", "json")
    assert curl("-x", p.url, f"{http_origin.base}/hello").returncode == 0
    assert curl(f"{p.url}/healthz").returncode == 0
    stop(p)
    recs = records(p.stderr_lines, "json")
    assert recs and not access_of(recs)
    assert any("listening on" in r.get("msg", "") for r in recs)


# --------------------------------------------------------------------------- paced requests

TOKEN = "shpat-logs-secret-1234"
# the mock Shopify of the pacing tests, in a process of its own, and its CA
shopify = test_pacing.shopify


def paced_elbasy(
    proxy: Callable[..., Proxy], api_ca: Any, tmp_path: Path, port: int, *extra: str
) -> tuple[Proxy, str]:
    return elbasy_for(
        proxy,
        api_ca,
        tmp_path,
        {"*.myshopify.com": port},
        "--log-format",
        "json",
        "--log-level",
        "info",
        *extra,
    )


def test_paced_held_and_shed_requests_and_debug_lines(
    proxy: Callable[..., Proxy], api_ca: Any, shopify: Any, tmp_path: Path
) -> None:
    p, ca = paced_elbasy(proxy, api_ca, tmp_path, shopify.port, "--log-level", "debug")
    got = burst(p, ca, "logs", TOKEN, 40)  # the 40th waits ~0.5 s for the bucket
    assert [st for st, _ in got] == [200] * 40
    shed = burst(p, ca, "logs", TOKEN, 1, "X-Elbasy-Max-Wait: 0\r\n")
    assert shed[0][0] == 429
    # a GraphQL query on a shop with one product costs less than its estimate: a refund
    shopify.configure(shop="refund", catalog={"products": 1})
    with session(p, ca, "refund") as t:
        body = json.dumps({"query": "{ products(first: 5) { edges { node { id title } } } }"})
        t.sendall(
            "POST /admin/api/2024-10/graphql.json HTTP/1.1\r\nHost: refund.myshopify.com\r\n"
            f"X-Shopify-Access-Token: {TOKEN}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        assert origins.read_response(origins.Reader(t)).status == 200

    def paced_lines() -> list[dict[str, Any]]:
        return [a for a in access_of(records(p.stderr_lines, "json")) if a["rule"]]

    assert wait_for(lambda: len(paced_lines()) >= 42), p.stderr
    assert TOKEN not in p.stderr  # accounts are hashed
    rest = [a for a in paced_lines() if a["rule"] == "shopify-admin-rest"]
    assert len(rest) == 41
    for a in rest:
        assert (a["host"], a["path"]) == ("logs.myshopify.com", "/admin/api/2024-10/products.json")
        assert a["account"].startswith("shopify-admin-rest|") and a["cost"] == 1
        assert a["worker"] == 0 and a["retried"] is False
    served, refused = rest[:40], rest[40]
    assert all(a["status"] == 200 and a["upstream_ms"] > 0 and not a["shed"] for a in served)
    held = served[-1]
    assert held["wait_ms"] > 200, held
    assert held["duration_ms"] >= held["wait_ms"] + held["upstream_ms"] - 5  # one loop turn
    assert served[0]["wait_ms"] < 50
    assert (refused["status"], refused["shed"], refused["upstream_ms"]) == (429, True, 0)
    (gql,) = [a for a in paced_lines() if a["rule"] == "shopify-admin-graphql"]
    assert gql["actual_cost"] < gql["cost"]

    debug = [r for r in records(p.stderr_lines, "json") if r["logger"] == "elbasy.pacing"]
    reserved = [r for r in debug if r["msg"].startswith("reserved ")]
    departs = [r for r in debug if r["msg"].startswith("departs ")]
    refunds = [r for r in debug if r["msg"].startswith("refund ")]
    assert len(reserved) >= 41 and len(departs) >= 41, debug[:5]
    for r in reserved + departs:
        assert {"rule", "account", "cost", "wait_ms"} <= set(r) and r["level"] == "DEBUG"
    assert max(r["wait_ms"] for r in departs if r["rule"] == "shopify-admin-rest") > 200
    assert any(r["wait_ms"] is not None and r["wait_ms"] > 200 for r in reserved)
    (refund,) = refunds
    assert refund["cost"] == gql["cost"] and refund["actual_cost"] == gql["actual_cost"]


def test_an_upstream_429_is_a_warning_with_the_servers_headers(
    proxy: Callable[..., Proxy], api_ca: Any, shopify: Any, tmp_path: Path
) -> None:
    p, ca = paced_elbasy(proxy, api_ca, tmp_path, shopify.port)
    # another process fills the bucket (elbasy has seen no answer yet)
    shopify.configure(shop="full", token=TOKEN, outside_traffic_rps=400)
    time.sleep(0.2)
    shopify.configure(shop="full", token=TOKEN, outside_traffic_rps=0)
    assert burst(p, ca, "full", TOKEN, 1)[0][0] == 429

    def warnings() -> list[dict[str, Any]]:
        recs = records(p.stderr_lines, "json")
        return [r for r in recs if r["level"] == "WARNING" and r["logger"] == "elbasy.pacing"]

    (w,) = wait_for(warnings)
    assert (w["rule"], w["status"], w["retry_after"]) == ("shopify-admin-rest", 429, 2.0)
    assert w["account"].startswith("shopify-admin-rest|") and TOKEN not in p.stderr
    assert w["headers"] == {"x-shopify-shop-api-call-limit": "40/40", "retry-after": "2.0"}
    (a,) = wait_for(lambda: [a for a in access_of(records(p.stderr_lines, "json")) if a["rule"]])
    assert (a["status"], a["shed"], a["account"]) == (429, False, w["account"])


@pytest.mark.parametrize("option", ["--log-file", "--access-log"])
def test_a_log_file_that_cannot_be_opened_stops_elbasy_with_its_name(
    option: str, tmp_path: Path
) -> None:
    path = tmp_path / "gone" / "x.log"
    out = subprocess.run(
        [sys.executable, "-m", "elbasy", "--listen", "127.0.0.1:0", option, str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=str(Path(__file__).resolve().parent.parent),
    )
    assert out.returncode != 0
    assert f"cannot open the log file {path}: No such file or directory" in out.stderr


def test_a_graphql_throttled_answer_is_a_warning_too(
    proxy: Callable[..., Proxy], api_ca: Any, shopify: Any, tmp_path: Path
) -> None:
    p, ca = paced_elbasy(proxy, api_ca, tmp_path, shopify.port)
    # another process spends the bucket (elbasy has seen no answer yet)
    shopify.configure(shop="spent", token=TOKEN, graphql_outside_rps=40_000)
    time.sleep(0.2)
    shopify.configure(shop="spent", token=TOKEN, graphql_outside_rps=0)
    with session(p, ca, "spent") as t:
        body = json.dumps({"query": "{ products(first: 50) { edges { node { id title } } } }"})
        t.sendall(
            "POST /admin/api/2024-10/graphql.json HTTP/1.1\r\nHost: spent.myshopify.com\r\n"
            f"X-Shopify-Access-Token: {TOKEN}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        answer = origins.read_response(origins.Reader(t))
    assert b"THROTTLED" in answer.body

    def warnings() -> list[dict[str, Any]]:
        recs = records(p.stderr_lines, "json")
        return [r for r in recs if r["level"] == "WARNING" and r["logger"] == "elbasy.pacing"]

    (w,) = wait_for(warnings)
    assert (w["rule"], w["status"]) == ("shopify-admin-graphql", 200)
    assert w["account"].startswith("shopify-admin-graphql|") and TOKEN not in p.stderr
    # the wait is the body's (throttleStatus); Shopify sends no rate-limit header with it
    assert w["retry_after"] > 0 and w["headers"] == {}
