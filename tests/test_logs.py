"""elbasy.logs: text and JSON lines on stderr, the access log, the startup banner."""

from __future__ import annotations

import calendar
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest

from elbasy import logs
from elbasy.logs import configure, log_access, startup_banner

TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
ACCESS_KEYS = {"client", "method", "target", "status", "bytes_up", "bytes_down", "duration_ms"}


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
    log_access("127.0.0.1:50312", "CONNECT", "example.com:443", 200, 517, 4312, 12.44)
    assert text_line(capsys) == (
        "INFO elbasy.access 127.0.0.1:50312 CONNECT example.com:443 200 up=517 down=4312 ms=12.4"
    )


def test_access_json(capsys: pytest.CaptureFixture[str]) -> None:
    configure("info", "json")
    log_access("[::1]:5000", "GET", "http://example.com/a/b", 404, 80, 1200, 3.25)
    assert json_line(capsys) == {
        "level": "INFO",
        "logger": "elbasy.access",
        "client": "[::1]:5000",
        "method": "GET",
        "target": "http://example.com/a/b",
        "status": 404,
        "bytes_up": 80,
        "bytes_down": 1200,
        "duration_ms": 3.25,
    }


def test_access_paced_request_names_its_rule_account_costs_and_wait(
    capsys: pytest.CaptureFixture[str],
) -> None:
    paced = (
        "shopify-admin-graphql",
        "shopify-admin-graphql|acme|1f2e3d4c5b6a7988",
        882,
        52.0,
        503.81,
    )
    configure("info", "text")
    log_access("c", "POST", "https://acme.myshopify.com/g", 200, 80, 900, 510.0, paced)
    line = capsys.readouterr().err.strip()
    assert line.endswith(
        " 200 up=80 down=900 ms=510.0 rule=shopify-admin-graphql"
        " account=shopify-admin-graphql|acme|1f2e3d4c5b6a7988 cost=882 actual=52.0 wait_ms=503.8"
    ), line
    configure("info", "json")
    log_access("c", "POST", "https://acme.myshopify.com/g", 200, 80, 900, 510.0, paced)
    obj = json_line(capsys)
    assert set(obj) == ACCESS_KEYS | {"level", "logger", "rule", "account", "cost"} | {
        "actual_cost",
        "wait_ms",
    }
    assert (obj["rule"], obj["cost"], obj["actual_cost"], obj["wait_ms"]) == (
        "shopify-admin-graphql",
        882,
        52.0,
        503.81,
    )
    # not answered yet (a client that left while held): no actual cost
    log_access("c", "POST", "/g", 499, 0, 0, 0.0, paced[:3] + (None, 12.5))
    assert json_line(capsys)["actual_cost"] is None


def test_access_json_has_exactly_the_contract_keys(capsys: pytest.CaptureFixture[str]) -> None:
    configure("debug", "json")
    log_access("c", "CONNECT", "h:1", 502, 0, 0, 0.0)
    assert set(json_line(capsys)) == ACCESS_KEYS | {"level", "logger"}


def test_access_json_escapes_and_odd_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    configure("info", "json")
    log_access('c"\\', "GET", '/\u00e9"\t', 200, 0, 0, float("nan"))
    obj = json_line(capsys)
    assert (obj["client"], obj["target"], obj["duration_ms"]) == ('c"\\', '/\u00e9"\\t', None)
    log_access("c", "GET", "/", 200, 0, 0, 1e-05)
    assert json_line(capsys)["duration_ms"] == 0.0  # rounded to microseconds
    log_access("c", "GET", "/", 200, 0, 0, 7)
    assert json_line(capsys)["duration_ms"] == 7


def test_access_disabled_does_no_work(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    configure("warning", "text")

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("a record was built while the access log is off")

    monkeypatch.setattr(logging, "LogRecord", boom)
    monkeypatch.setattr(logs, "_redact_target", boom)
    log_access("c", "GET", "http://h/?token=secret", 200, 1, 2, 3.0)
    assert lines(capsys) == []


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
        ("http://user:pw@example.com", "http://example.com"),
        ("http://example.com/x?api_key=s3cret&page=2", "http://example.com/x?api_key=*&page=*"),
        ("http://example.com/x?flag&token=abc#frag", "http://example.com/x?flag=*&token=*"),
        ("/search?q=a%20b", "/search?q=*"),
        ("http://example.com/a@b", "http://example.com/a@b"),  # '@' in the path is no userinfo
        ("example.com:443", "example.com:443"),
    ],
)
def test_access_target_secrets_are_not_logged(
    capsys: pytest.CaptureFixture[str], target: str, logged: str
) -> None:
    configure("info", "json")
    log_access("c", "GET", target, 200, 0, 0, 1.0)
    obj = json_line(capsys)
    assert obj["target"] == logged
    assert "s3cret" not in json.dumps(obj) and "pw" not in obj["target"]


def test_access_text_stays_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure("info", "text")
    log_access("c", "G\nET", "/a b\r\nX-Injected: 1", 400, 0, 0, 0.0)
    assert text_line(capsys) == (
        "INFO elbasy.access c G\\nET /a%20b\\r\\nX-Injected:%201 400 up=0 down=0 ms=0.0"
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
    configure("error", "json")
    startup_banner("1.2.3", "127.0.0.1", 40123)
    startup_banner("1.2.3", "::1", 8080)
    assert lines(capsys) == [
        "elbasy 1.2.3 listening on 127.0.0.1:40123",
        "elbasy 1.2.3 listening on [::1]:8080",
    ]
