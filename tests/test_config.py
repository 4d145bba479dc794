"""elbasy.config: connect-to rules, listen addresses, validation, TOML files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from elbasy.config import (
    CONFIG_KEYS,
    Config,
    ConfigError,
    ConnectTo,
    format_hostport,
    load_toml,
    parse_listen,
    route,
    to_toml,
)

# --------------------------------------------------------------------------- ConnectTo.parse


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        # curl's manual example: example.com:443 is dialed at example.net:8443
        ("example.com:443:example.net:8443", ConnectTo("example.com", 443, "example.net", 8443)),
        # any host, any port -> fixed host, keep the port
        ("::example.net:", ConnectTo("", None, "example.net", None)),
        # keep the host, change the port
        ("example.com:80::8080", ConnectTo("example.com", 80, "", 8080)),
        # everything empty: a rule that matches everything and changes nothing
        (":::", ConnectTo("", None, "", None)),
        ("example.com::127.0.0.1:", ConnectTo("example.com", None, "127.0.0.1", None)),
        # IPv6 on either side, in brackets
        ("example.com:443:[::1]:8443", ConnectTo("example.com", 443, "::1", 8443)),
        ("[::1]:443:[2001:db8::2]:", ConnectTo("::1", 443, "2001:db8::2", None)),
        ("[2001:DB8::*]:443:127.0.0.1:1", ConnectTo("2001:db8::*", 443, "127.0.0.1", 1)),
        # globs, lower-cased
        ("*.Example.COM:443:127.0.0.1:8443", ConnectTo("*.example.com", 443, "127.0.0.1", 8443)),
        ("api?.example.com:443:h:1", ConnectTo("api?.example.com", 443, "h", 1)),
        ("[ab].example.com:443:h:1", ConnectTo("[ab].example.com", 443, "h", 1)),
        ("[ab]:443:h:1", ConnectTo("[ab]", 443, "h", 1)),
        # surrounding whitespace (TOML, env lists) is ignored; ports at the limits
        ("  a:1:b:65535 ", ConnectTo("a", 1, "b", 65535)),
        (
            "a_b-c.d:443:upstream_1.internal:443",
            ConnectTo("a_b-c.d", 443, "upstream_1.internal", 443),
        ),
    ],
)
def test_connect_to_parse(spec: str, expected: ConnectTo) -> None:
    assert ConnectTo.parse(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "expected HOST:PORT:CONNECT-TO-HOST:CONNECT-TO-PORT"),
        ("   ", "expected HOST:PORT:CONNECT-TO-HOST:CONNECT-TO-PORT"),
        ("example.com", "expected HOST:PORT:CONNECT-TO-HOST:CONNECT-TO-PORT"),
        ("example.com:443", "expected HOST:PORT:CONNECT-TO-HOST:CONNECT-TO-PORT"),
        ("example.com:443:127.0.0.1", "expected HOST:PORT:CONNECT-TO-HOST:CONNECT-TO-PORT"),
        ("a:443:::1:8443", "unexpected ':1:8443' at the end"),
        ("a:443:b:1:2", "unexpected ':2' at the end"),
        ("a:https:b:443", "PORT 'https' must be a port number from 1 to 65535"),
        ("a:0:b:443", "PORT '0' must be a port number"),
        ("a:65536:b:443", "PORT '65536' must be a port number"),
        ("a:-1:b:443", "PORT '-1' must be a port number"),
        ("a:443:b:99999", "CONNECT-TO-PORT '99999' must be a port number"),
        ("a:443:b: 1", "CONNECT-TO-PORT ' 1' must be a port number"),
        ("a:443:b:١", "CONNECT-TO-PORT '١' must be a port number"),  # Arabic-Indic digit
        ("[::1:443:b:1", "HOST has '[' without ']'"),
        ("a:443:[::1:1", "CONNECT-TO-HOST has '[' without ']'"),
        ("a:443:[nothex::]:1", "CONNECT-TO-HOST [nothex::] is not an IPv6 address"),
        ("a:443:*.b.com:1", "CONNECT-TO-HOST '*.b.com' is not a host name"),
        ("a:443:[b]:1", "CONNECT-TO-HOST '[b]' is not a host name"),
        ("a b:443:c:1", "HOST 'a b' is not a host name, address or glob"),
        ("user@a:443:c:1", "HOST 'user@a' is not a host name"),
        ("[::g]:443:c:1", "HOST '::g' is not a host name"),
    ],
)
def test_connect_to_parse_errors(spec: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        ConnectTo.parse(spec)
    text = str(info.value)
    assert message in text
    assert f"invalid connect-to {spec.strip()!r}" in text
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "spec",
    [
        "example.com:443:example.net:8443",
        "::example.net:",
        ":::",
        "[::1]:443:[2001:db8::2]:",
        "*.example.com::[::1]:8443",
        "[ab]:443:h:1",
    ],
)
def test_connect_to_str_round_trips(spec: str) -> None:
    rule = ConnectTo.parse(spec)
    assert str(rule) == spec
    assert ConnectTo.parse(str(rule)) == rule


# --------------------------------------------------------------------------- match / route


def test_match_exact_host_and_port() -> None:
    rule = ConnectTo.parse("example.com:443:example.net:8443")
    assert rule.match("example.com", 443) == ("example.net", 8443)
    assert rule.match("EXAMPLE.com", 443) == ("example.net", 8443)
    assert rule.match("example.com.", 443) == ("example.net", 8443)  # FQDN trailing dot
    assert rule.match("example.com", 80) is None
    assert rule.match("www.example.com", 443) is None
    assert rule.match("example.org", 443) is None


def test_match_empty_fields_mean_any_and_keep() -> None:
    assert ConnectTo.parse("::example.net:").match("anything", 1234) == ("example.net", 1234)
    assert ConnectTo.parse("example.com:80::8080").match("example.com", 80) == (
        "example.com",
        8080,
    )
    assert ConnectTo.parse("example.com:80::8080").match("Example.Com", 80) == (
        "Example.Com",  # the requested host is kept as the client sent it
        8080,
    )
    assert ConnectTo.parse(":::").match("h", 9) == ("h", 9)
    assert ConnectTo.parse("h::x:").match("h", 9) == ("x", 9)


def test_match_globs() -> None:
    rule = ConnectTo.parse("*.myshopify.com:443:127.0.0.1:8443")
    assert rule.match("shop-1.myshopify.com", 443) == ("127.0.0.1", 8443)
    assert rule.match("a.b.MyShopify.com", 443) == ("127.0.0.1", 8443)
    assert rule.match("myshopify.com", 443) is None
    assert rule.match("evilmyshopify.com", 443) is None
    assert rule.match("shop.myshopify.com.evil.net", 443) is None
    q = ConnectTo.parse("api?.example.com::h:")
    assert q.match("api1.example.com", 1) == ("h", 1)
    assert q.match("api12.example.com", 1) is None
    cls = ConnectTo.parse("api[12].example.com::h:")
    assert cls.match("api2.example.com", 1) == ("h", 1)
    assert cls.match("api3.example.com", 1) is None


def test_match_ipv6_hosts_with_or_without_brackets() -> None:
    rule = ConnectTo.parse("[::1]:443:[2001:db8::2]:8443")
    assert rule.match("::1", 443) == ("2001:db8::2", 8443)
    assert rule.match("[::1]", 443) == ("2001:db8::2", 8443)
    assert rule.match("::2", 443) is None


def test_route_first_match_wins() -> None:
    rules = (
        ConnectTo.parse("api.example.com:443:10.0.0.1:8443"),
        ConnectTo.parse("*.example.com:443:10.0.0.2:"),
        ConnectTo.parse(":80::8080"),
    )
    assert route(rules, "api.example.com", 443) == ("10.0.0.1", 8443)
    assert route(rules, "www.example.com", 443) == ("10.0.0.2", 443)
    assert route(rules, "other.net", 80) == ("other.net", 8080)
    assert route(rules, "other.net", 443) == ("other.net", 443)
    assert route((), "x", 1) == ("x", 1)
    assert route([], "x", 1) == ("x", 1)


# --------------------------------------------------------------------------- listen


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("localhost:0", ("localhost", 0)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
        (":8080", ("0.0.0.0", 8080)),
        ("[::1]:8080", ("::1", 8080)),
        ("[::]:9000", ("::", 9000)),
        (" 127.0.0.1:1 ", ("127.0.0.1", 1)),
    ],
)
def test_parse_listen(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("8080", "expected HOST:PORT"),
        ("", "expected HOST:PORT"),
        ("localhost", "expected HOST:PORT"),
        ("::1:8080", "put an IPv6 address in brackets"),
        ("[::1]8080", "expected HOST:PORT"),
        ("[::1:8080", "expected HOST:PORT"),
        ("[nothex]:8080", "[nothex] is not an IPv6 address"),
        ("host:", "port '' must be 0 to 65535"),
        ("host:http", "port 'http' must be 0 to 65535"),
        ("host:65536", "port '65536' must be 0 to 65535"),
        ("host:-1", "port '-1' must be 0 to 65535"),
        ("bad host:80", "'bad host' is not a host name or address"),
    ],
)
def test_parse_listen_errors(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_listen(value)
    assert message in str(info.value)
    assert info.value.field == "listen"


def test_format_hostport() -> None:
    assert format_hostport("127.0.0.1", 8080) == "127.0.0.1:8080"
    assert format_hostport("::1", 8080) == "[::1]:8080"
    assert format_hostport("[::1]", 8080) == "[::1]:8080"


# --------------------------------------------------------------------------- Config


def test_config_defaults() -> None:
    c = Config()
    assert (c.listen_host, c.listen_port, c.listen) == ("127.0.0.1", 8080, "127.0.0.1:8080")
    assert (c.log_level, c.log_format) == ("info", "text")
    assert (c.head_timeout, c.connect_timeout, c.idle_timeout) == (10.0, 10.0, 300.0)
    assert (c.keepalive_timeout, c.response_timeout) == (60.0, 60.0)
    assert c.max_head_bytes == 65536
    assert c.connect_to == ()


def test_config_is_frozen_and_normalizes() -> None:
    rule = ConnectTo.parse("a:1:b:2")
    c = Config(head_timeout=5, log_level="DEBUG", log_format="JSON", connect_to=[rule])  # type: ignore[arg-type]
    assert c.head_timeout == 5.0 and isinstance(c.head_timeout, float)
    assert (c.log_level, c.log_format) == ("debug", "json")
    assert c.connect_to == (rule,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.listen_port = 1  # type: ignore[misc]
    assert Config(listen_host="::1", listen_port=0).listen == "[::1]:0"


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"head_timeout": 0}, "head_timeout", "> 0, got 0"),
        ({"connect_timeout": -1.5}, "connect_timeout", "> 0, got -1.5"),
        ({"idle_timeout": float("inf")}, "idle_timeout", "finite"),
        ({"keepalive_timeout": float("nan")}, "keepalive_timeout", "finite"),
        ({"response_timeout": "60"}, "response_timeout", "must be a number of seconds"),
        ({"response_timeout": True}, "response_timeout", "must be a number of seconds"),
        ({"max_head_bytes": 1023}, "max_head_bytes", "from 1024 to 16777216"),
        ({"max_head_bytes": 16 * 1024 * 1024 + 1}, "max_head_bytes", "from 1024"),
        ({"max_head_bytes": 4096.0}, "max_head_bytes", "must be an integer"),
        ({"listen_port": 65536}, "listen_port", "0 to 65535"),
        ({"listen_port": -1}, "listen_port", "0 to 65535"),
        ({"listen_port": "80"}, "listen_port", "0 to 65535"),
        ({"listen_host": ""}, "listen_host", "non-empty"),
        ({"log_level": "verbose"}, "log_level", "debug, info, warning, error; got 'verbose'"),
        ({"log_level": None}, "log_level", "one of"),
        ({"log_format": "xml"}, "log_format", "text, json, logfmt; got 'xml'"),
        ({"connect_to": ("a:1:b:2",)}, "connect_to", "must hold ConnectTo rules"),
    ],
)
def test_config_validation(kwargs: dict[str, object], field: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert message in str(info.value)


def test_config_limits_accepted() -> None:
    Config(max_head_bytes=1024, listen_port=0, head_timeout=0.001)
    Config(max_head_bytes=16 * 1024 * 1024, listen_port=65535)


# --------------------------------------------------------------------------- TOML


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "elbasy.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_load_toml_normalizes_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
listen = "127.0.0.1:9000"
log-level = "debug"
log_format = "json"
head-timeout = 5
connect_timeout = 2.5
max-head-bytes = 8192
connect-to = ["a:443:127.0.0.1:8443", "::b:"]
""",
    )
    assert load_toml(path) == {
        "listen": "127.0.0.1:9000",
        "log_level": "debug",
        "log_format": "json",
        "head_timeout": 5,
        "connect_timeout": 2.5,
        "max_head_bytes": 8192,
        "connect_to": ["a:443:127.0.0.1:8443", "::b:"],
    }
    assert load_toml(str(path))["listen"] == "127.0.0.1:9000"


def test_load_toml_empty_file_and_single_rule(tmp_path: Path) -> None:
    assert load_toml(write(tmp_path, "")) == {}
    assert load_toml(write(tmp_path, 'connect_to = "a:1:b:2"')) == {"connect_to": ["a:1:b:2"]}


def test_load_toml_unknown_key(tmp_path: Path) -> None:
    path = write(tmp_path, 'listen = ":1"\nlisten_adress = "x"\n')
    with pytest.raises(ConfigError) as info:
        load_toml(path)
    assert str(path) in str(info.value)
    assert "unknown key 'listen_adress'" in str(info.value)


def test_load_toml_unknown_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'server'"):
        load_toml(write(tmp_path, '[server]\nlisten = ":1"\n'))


def test_load_toml_key_twice(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key 'log-level' is given twice"):
        load_toml(write(tmp_path, 'log_level = "info"\nlog-level = "debug"\n'))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("listen = 8080", "key 'listen': expected string, got 8080"),
        ('head_timeout = "10"', "key 'head_timeout': expected number, got '10'"),
        ("head_timeout = true", "key 'head_timeout': expected number, got True"),
        ("max_head_bytes = 1.5", "key 'max_head_bytes': expected integer, got 1.5"),
        ("connect_to = [1]", "key 'connect_to': expected array of strings, got [1]"),
    ],
)
def test_load_toml_wrong_types(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_toml(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_load_toml_bad_syntax(tmp_path: Path) -> None:
    path = write(tmp_path, "listen = \n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_toml(path)


def test_load_toml_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file .*No such file"):
        load_toml(tmp_path / "nope.toml")


def test_config_keys_are_the_option_names() -> None:
    assert set(CONFIG_KEYS) == {
        "listen",
        "log_level",
        "log_format",
        "metrics_listen",
        "metrics_top_accounts",
        "log_file",
        "access_log",
        "auth_file",
        "auth_env",
        "allow_clients",
        "workers",
        "drain_timeout",
        "head_timeout",
        "connect_timeout",
        "idle_timeout",
        "keepalive_timeout",
        "response_timeout",
        "exchange_timeout",
        "max_connections",
        "max_client_connections",
        "max_head_bytes",
        "splice",
        "connect_to",
        "reverse",
        "transparent",
        "listen_tls",
        "tls_cert",
        "tls_key",
        "allow_hosts",
        "deny_hosts",
        "allow_ports",
        "allow_internal",
        "dns_timeout",
        "intercept",
        "data_dir",
        "upstream_ca",
        "unconstrained_ca",
        "leaf_mint_rate",
        "leaf_mint_burst",
        "leaf_cache_files",
        "rules",
        "rule",
        "max_wait",
        "retry_idempotent",
        "quota_margin",
        "quota_store",
        "quota_capacity",
        "quota_instances",
        "quota_redis_timeout",
    }


def test_to_toml_round_trips(tmp_path: Path) -> None:
    config = Config(
        listen_host="::1",
        listen_port=0,
        log_level="warning",
        log_format="json",
        head_timeout=0.25,
        max_head_bytes=2048,
        connect_to=(ConnectTo.parse("*.example.com:443:[::1]:8443"), ConnectTo.parse("::x:")),
    )
    text = to_toml(config)
    assert 'listen = "[::1]:0"\n' in text
    assert 'connect_to = ["*.example.com:443:[::1]:8443", "::x:"]\n' in text
    loaded = load_toml(write(tmp_path, text))
    assert loaded["head_timeout"] == 0.25
    assert loaded["max_head_bytes"] == 2048
    assert parse_listen(loaded["listen"]) == ("::1", 0)
    assert tuple(ConnectTo.parse(s) for s in loaded["connect_to"]) == config.connect_to


# --------------------------------------------------------------------------- rules

MY_RULE = {
    "id": "my-api",
    "docs": ["https://example.com/limits"],
    "match": {"hosts": ["api.example.com"], "path": "^/v1/"},
    "account": {"parts": [{"name": "key", "from": "header", "header": "X-Key", "hash": True}]},
    "limits": [{"name": "per-second", "kind": "bucket", "capacity": 10, "rate": 0.5}],
}


def test_config_rules_default_to_every_rule() -> None:
    from elbasy.rules import BUILTIN_IDS

    assert Config().rules is None
    assert Config().ruleset().ids() == list(BUILTIN_IDS)
    assert Config(rule=(MY_RULE,)).ruleset().ids() == ["my-api", *BUILTIN_IDS]


def test_config_rules_subset_and_errors() -> None:
    config = Config(rules=["etsy-v3", "my-api"], rule=[MY_RULE])
    assert config.rules == ("etsy-v3", "my-api") and config.rule == (MY_RULE,)
    assert config.ruleset().ids() == ["my-api", "etsy-v3"]
    with pytest.raises(ConfigError) as info:
        Config(rules=("etsy-v3", "nope"))
    assert info.value.field == "rules" and "unknown rule 'nope'" in str(info.value)
    bad = {**MY_RULE, "limits": [{"name": "x", "kind": "bucket", "capacity": 10, "rate": 0}]}
    with pytest.raises(ConfigError) as info:
        Config(rule=(bad,))
    assert info.value.field == "rule"
    assert "rule 'my-api': limits[0].rate: must be a number > 0" in str(info.value)


def test_load_toml_rules_and_rule_tables(tmp_path: Path) -> None:
    text = """
rules = "etsy-v3"

[[rule]]
id = "my-api"
match = { hosts = ["api.example.com"] }
limits = [{ name = "a", kind = "window", capacity = 5, window = 1 }]
"""
    loaded = load_toml(write(tmp_path, text))
    assert loaded["rules"] == ["etsy-v3"]
    assert loaded["rule"][0]["id"] == "my-api"
    with pytest.raises(ConfigError, match="key 'rule': expected array of tables"):
        load_toml(write(tmp_path, 'rule = "x"\n'))


def test_to_toml_round_trips_rules(tmp_path: Path) -> None:
    config = Config(rules=("my-api",), rule=(MY_RULE,))
    text = to_toml(config)
    assert 'rules = ["my-api"]\n' in text
    assert "\n[[rule]]\n" in text
    loaded = load_toml(write(tmp_path, text))
    assert loaded["rules"] == ["my-api"]
    assert loaded["rule"] == [MY_RULE]
    assert "rules =" not in to_toml(Config()) and "[[rule]]" not in to_toml(Config())
    assert "# rules: not set (every rule)\n" in to_toml(Config())
