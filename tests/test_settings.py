"""elbasy.settings and the settings table: every declared setting reaches every place.

A setting declared in ``elbasy.config`` (a Config field, or the --config and
--listen rows) must be a click option with its env var, a config file key that
round-trips through ``to_toml``/``load_toml``, and follow the precedence
command line > environment > config file > default; the Loop, the Pacer and
the quota's Safety get exactly the settings declared for them. A new setting
needs one more pair of sample values in ``SAMPLES`` below (a test says so).
"""

from __future__ import annotations

import ast
import dataclasses
import math
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from elbasy import server
from elbasy.ca import default_data_dir
from elbasy.cli import main
from elbasy.config import (
    CONFIG_KEYS,
    SETTINGS,
    Config,
    ConfigError,
    build_config,
    load_toml,
    setting_named,
    to_toml,
)
from elbasy.pages import LOOP_PAGES
from elbasy.settings import (
    Choice,
    Directory,
    File,
    Flag,
    Fraction,
    Integer,
    Seconds,
    Setting,
    Text,
    field_kinds,
    part_of,
    setting,
    toml_value,
)

REPO = Path(__file__).resolve().parent.parent

RULE = {
    "id": "my-api",
    "match": {"hosts": ["api.example.com"]},
    "limits": [{"name": "a", "kind": "window", "capacity": 5, "window": 1}],
}

#: two different values for every config file key, spelled as the option (and
#: TOML) takes them; the second is the one a higher source sets
SAMPLES: dict[str, tuple[Any, Any]] = {
    "listen": ("127.0.0.1:9001", "[::1]:9002"),
    "log_level": ("debug", "WARNING"),
    "log_format": ("json", "TEXT"),
    "head_timeout": (1.5, 2),
    "connect_timeout": (3, 4.25),
    "idle_timeout": (5.5, 6),
    "keepalive_timeout": (7, 8.5),
    "response_timeout": (9, 10.5),
    "exchange_timeout": (120, 600.5),
    "max_connections": (10_000, 0),
    "max_client_connections": (64, 1024),
    "max_head_bytes": (2048, 4096),
    "splice": ("never", "always"),
    "connect_to": (["a:443:127.0.0.1:8443", "::b:"], ["*.c.com::[::1]:1"]),
    "reverse": (["127.0.0.1:9101=https://a.example.com"], ["[::1]:9102=http://b.example.com:8080"]),
    "transparent": (["127.0.0.1:9443"], ["[::1]:9444", "0.0.0.0:9445"]),
    "intercept": (["*.myshopify.com"], ["API.etsy.com", "*.b.com"]),
    "allow_hosts": (["*.myshopify.com"], ["API.github.com", "*.b.com"]),
    "deny_hosts": (["admin.example.com"], ["*.internal"]),
    "allow_ports": (["443"], ["8443", "9000-9100"]),
    "allow_internal": (["db.internal"], ["localhost", "127.0.0.1"]),
    "dns_timeout": (1, 2.5),
    "data_dir": ("/tmp/elbasy-a", "/tmp/elbasy-b"),
    "upstream_ca": ("/tmp/a.pem", "/tmp/b.pem"),
    "listen_tls": ("127.0.0.1:8443", "[::1]:9443"),
    "tls_cert": ("/tmp/a-cert.pem", "/tmp/b-cert.pem"),
    "tls_key": ("/tmp/a-key.pem", "/tmp/b-key.pem"),
    "unconstrained_ca": (False, True),
    "leaf_mint_rate": (0, 600),
    "leaf_mint_burst": (1, 50),
    "leaf_cache_files": (10, 5000),
    "rules": (["etsy-v3"], ["github-rest", "bigcommerce"]),
    "rule": ([RULE], [{**RULE, "id": "other-api"}]),
    "max_wait": (0, 3600),
    "retry_idempotent": (True, False),
    "quota_margin": (0, 0.25),
    "quota_store": ("shm", "local"),
    "quota_capacity": (1024, 200000),
    "quota_instances": (2, 1024),
    "quota_redis_timeout": (0.01, 1.5),
    "log_file": ("/tmp/elbasy-a.log", "/tmp/elbasy-b.log"),
    "access_log": ("/tmp/elbasy-access.log", "off"),
    "auth_file": ("/tmp/elbasy-a.auth", "/tmp/elbasy-b.auth"),
    "auth_env": ("PROXY_TOKENS", "OTHER_TOKENS"),
    "allow_clients": (["10.0.0.0/8"], ["192.168.0.0/16", "::1/128"]),
    "workers": (2, "auto"),
    "drain_timeout": (0, 12.5),
    "metrics_listen": ("127.0.0.1:9100", "[::1]:9101"),
    "metrics_top_accounts": (0, 50),
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("ELBASY_"):
            monkeypatch.delenv(name)


def option_settings() -> list[Setting]:
    return [s for s in SETTINGS if s.option and s.name != "config"]


def by_name(name: str) -> Setting:
    found = setting_named(name)
    assert found is not None and found.name == name
    return found


def expected(name: str, value: Any) -> Any:
    """What show-config prints for setting ``name`` set to ``value``."""
    s = by_name(name)
    return s.kind.dump(s, build_config(**{name: value}))


def cli_args(name: str, value: Any) -> list[str]:
    s = by_name(name)
    if isinstance(s.kind, Flag):
        if s.kind.negatable:
            return [s.flag if value else f"--no-{s.flag[2:]}"]
        assert value, "a flag without --no- can only be turned on"
        return [s.flag]
    if s.kind.multiple:
        return [f"{s.flag}={v}" for v in value]
    if isinstance(value, list):  # --rules a,b
        return [f"{s.flag}={','.join(value)}"]
    return [f"{s.flag}={value}"]


def env_value(name: str, value: Any) -> str:
    s = by_name(name)
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, list):
        return (" " if s.kind.multiple else ",").join(value)
    return str(value)


def file_text(values: dict[str, Any]) -> str:
    plain = "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items() if k != "rule")
    tables = values.get("rule", [])
    return plain + by_name("rule").kind.toml_text("rule", tables)


def show_config(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    result = CliRunner().invoke(main, [*args, "show-config"], env=env, prog_name="elbasy")
    assert result.exit_code == 0, result.output
    return tomllib.loads(result.stdout)


# --------------------------------------------------------------------------- the table


def test_samples_cover_every_config_key() -> None:
    assert set(SAMPLES) == set(CONFIG_KEYS), "add sample values for the new setting"


def test_config_keys_come_from_the_table() -> None:
    assert dict(CONFIG_KEYS) == {s.name: s.kind.toml for s in SETTINGS if s.toml}
    assert [s.name for s in SETTINGS if not s.toml] == ["config"]
    assert [s.name for s in SETTINGS if not s.option] == ["rule"]


def test_every_field_belongs_to_one_setting() -> None:
    owners = {name: owner for name, _, owner in field_kinds(Config)}
    assert list(owners) == [f.name for f in dataclasses.fields(Config)]
    assert owners["listen_host"] == owners["listen_port"] == "listen"
    claimed = [name for s in SETTINGS for name in s.field_names]
    assert sorted(claimed) == sorted(owners)
    assert setting_named("listen_port") is by_name("listen")
    assert setting_named("nope") is None and setting_named(None) is None


def test_a_field_without_a_declaration_is_refused() -> None:
    @dataclasses.dataclass
    class Bad:
        ok: float = setting(Seconds(), 1.0, "fine")
        part: int = part_of("ok", Integer(0, 1), 0)
        plain: int = 3

    with pytest.raises(TypeError, match=r"Bad\.plain is declared without setting"):
        field_kinds(Bad)


def test_every_setting_is_a_click_option_with_its_env_var() -> None:
    params = {p.name: p for p in main.params if isinstance(p, click.Option)}
    assert set(params) == {s.name for s in SETTINGS if s.option} | {"version"}
    for s in SETTINGS:
        if not s.option:
            continue
        param = params[s.name]
        assert param.opts == [s.flag], s.name
        assert param.envvar == s.envvar == "ELBASY_" + s.name.upper()
        assert s.help and param.help and param.help.startswith(s.help)
        assert param.metavar == s.option_metavar
    # in table order, after --version
    names = [p.name for p in main.params]
    assert names[: len(SETTINGS)] == ["version", *(s.name for s in SETTINGS if s.option)]


def test_help_shows_every_option_and_its_default() -> None:
    ctx = click.Context(main, info_name="elbasy", **main.context_settings)
    params = {p.name: p for p in main.params}
    defaults = Config()
    for s in option_settings():
        record = params[s.name].get_help_record(ctx)
        assert record is not None
        line = " ".join(record)
        default = s.kind.dump(s, defaults)
        if s.default_text is not None:
            assert f"[default: {s.default_text}]" in line
        elif isinstance(s.kind, Flag) and s.kind.negatable:
            assert f"[default: {'' if default else 'no-'}{s.name.replace('_', '-')}]" in line
        elif default not in (None, [], False):
            assert f"[default: {default}]" in line, line
        else:
            assert "[default:" not in line, line


def test_readme_lists_every_option() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| `(--[a-z-]+)", readme, re.MULTILINE))
    assert listed == {s.flag for s in SETTINGS if s.option}


# --------------------------------------------------------------------------- round trips


def test_every_setting_round_trips_through_to_toml_and_load_toml(tmp_path: Path) -> None:
    configs = [
        build_config(**{name: pair[pick] for name, pair in SAMPLES.items()}) for pick in (0, 1)
    ]
    for s in SETTINGS:
        if s.toml:  # the two samples differ, so one of them is no default
            assert s.kind.dump(s, configs[0]) != s.kind.dump(s, configs[1]), s.name
    for pick, config in enumerate(configs):
        text = to_toml(config)
        path = tmp_path / f"c{pick}.toml"
        path.write_text(text, encoding="utf-8")
        loaded = load_toml(path)
        assert set(loaded) == set(CONFIG_KEYS)
        assert build_config(**loaded) == config
        assert to_toml(build_config(**loaded)) == text
        # and the command reads the file back to the same settings
        result = CliRunner().invoke(main, ["--config", str(path), "show-config"])
        assert result.exit_code == 0, result.output
        assert result.stdout == text


@pytest.mark.parametrize("source", ["command line", "environment", "config file"])
def test_every_setting_from_each_source(source: str, tmp_path: Path) -> None:
    values = {name: pair[1] for name, pair in SAMPLES.items()}
    args: list[str] = []
    env: dict[str, str] = {}
    in_file = {"rule": values["rule"]}  # no option: a config file's only
    for s in option_settings():
        if source == "command line":
            args += cli_args(s.name, values[s.name])
        elif source == "environment":
            env[s.envvar] = env_value(s.name, values[s.name])
        else:
            in_file[s.name] = values[s.name]
    path = tmp_path / "elbasy.toml"
    path.write_text(file_text(in_file), encoding="utf-8")
    got = show_config(["--config", str(path), *args], env)
    assert got == tomllib.loads(to_toml(build_config(**values)))


@pytest.mark.parametrize("name", [s.name for s in option_settings()])
def test_precedence_command_line_environment_file_default(name: str, tmp_path: Path) -> None:
    low, high = SAMPLES[name]
    path = tmp_path / "elbasy.toml"
    path.write_text(file_text({name: low}), encoding="utf-8")
    s = by_name(name)
    default = s.kind.dump(s, Config())
    if name == "data_dir":  # show-config says where the CA lives
        default = str(default_data_dir())
    assert show_config([]).get(name) == default
    assert show_config(["--config", str(path)]).get(name) == expected(name, low)
    assert show_config(["--config", str(path)], {s.envvar: env_value(name, high)}).get(
        name
    ) == expected(name, high)
    assert show_config(
        ["--config", str(path), *cli_args(name, high)], {s.envvar: env_value(name, low)}
    ).get(name) == expected(name, high)


# --------------------------------------------------------------------------- the loop, the pacer


def stub_keywords() -> dict[str, Any]:
    """The keyword-only parameters of Loop.__init__ in elbasy/_loop.pyi, with defaults."""
    tree = ast.parse((REPO / "elbasy" / "_loop.pyi").read_text(encoding="utf-8"))
    loop = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Loop")
    init = next(n for n in loop.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    return {
        a.arg: ast.literal_eval(d) if d is not None else None
        for a, d in zip(init.args.kwonlyargs, init.args.kw_defaults, strict=True)
    }


def test_loop_stub_takes_the_loop_settings() -> None:
    loop = Config().loop_settings()
    stub = stub_keywords()
    assert {
        k: v
        for k, v in stub.items()
        if k
        not in (
            "server_tls",
            "client_tls",
            "listen_exclusive",
            "quota_fd",
            "pages",
            "counters",
            "client_allowed",
            "sites",
            "instance_counts",
        )
    } == loop
    assert set(loop) == {s.keyword for s in SETTINGS if s.to == "loop"}


def test_settings_for_each_component() -> None:
    config = build_config(splice="never", max_wait=5, retry_idempotent=True, quota_margin=0.1)
    assert config.loop_settings()["splice"] == 2  # the loop takes SPLICE_MODES' index
    assert config.pacer_settings() == {"max_wait": 5.0, "retry_idempotent": True}
    assert config.safety_settings() == {"margin": 0.1}
    assert config.settings_for("loop") == config.loop_settings()


def test_worker_gives_the_loop_and_pacer_exactly_their_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: dict[str, dict[str, Any]] = {}

    def recording(name: str, real: Any) -> Any:
        def make(*args: Any, **kwargs: Any) -> Any:
            seen[name] = kwargs
            return real(*args, **kwargs)

        return make

    for name in ("Loop", "Pacer", "Safety"):
        monkeypatch.setattr(server, name, recording(name, getattr(server, name)))
    config = build_config(
        listen="127.0.0.1:0",
        rules="",  # no rule: nothing intercepted, no CA made
        keepalive_timeout=7,
        max_head_bytes=2048,
        splice="always",
        max_wait=3,
        quota_margin=0.2,
    )
    worker = server.Worker(config)  # the real Loop takes every keyword it is given
    try:
        assert seen["Loop"] == {
            **config.loop_settings(),
            "server_tls": None,
            "client_tls": None,
            "listen_exclusive": False,  # its own listener, not the supervisor's shared one
            "quota_fd": -1,  # its own LocalStore: no other worker moves its lines
            "pages": LOOP_PAGES,  # what the loop answers when the policy's call raised
            # its counters, in its slot of the metrics memory
            "counters": worker.metrics.loop_counters,
            "client_allowed": None,  # no --allow-clients: nothing is asked at accept
            "sites": [],  # no --reverse, --transparent or --listen-tls listener
            # the connection limits count in the metrics memory (its own, one slot)
            "instance_counts": worker.metrics.instance.connections_of(0),
        }
        pacer = {k: v for k, v in seen["Pacer"].items() if k not in ("wall", "mono", "metrics")}
        assert pacer == config.pacer_settings()
        assert seen["Safety"] == config.safety_settings() == {"margin": 0.2}
    finally:
        worker.close()


# --------------------------------------------------------------------------- kinds


def reason(kind: Any, value: object) -> str:
    with pytest.raises(ConfigError) as info:
        kind.check(value)
    assert info.value.field is None
    return info.value.reason


def test_seconds() -> None:
    kind = Seconds()
    assert kind.check(1) == 1.0 and isinstance(kind.check(1), float)
    assert kind.check(0.001) == 0.001
    for bad in (0, -1.5, math.inf, math.nan):
        assert reason(kind, bad).startswith("must be a finite number of seconds > 0, got ")
    for bad in ("1", True, None):
        assert reason(kind, bad) == f"must be a number of seconds, got {bad!r}"
    bounded = Seconds(0, 3600)
    assert bounded.check(0) == 0.0 and bounded.check(3600) == 3600.0
    for bad in (-0.1, 3600.5, math.nan, "5", False):
        assert reason(bounded, bad) == f"must be 0 to 3600 seconds, got {bad!r}"


def test_integer() -> None:
    kind = Integer(1, 10, "ten")
    assert kind.check(1) == 1 and kind.check(10) == 10
    for bad in (0, 11, 5.0, True, "5"):
        assert reason(kind, bad) == f"must be an integer from 1 to 10 (ten), got {bad!r}"
    assert reason(Integer(0, 2), 3) == "must be an integer from 0 to 2, got 3"


def test_fraction() -> None:
    kind = Fraction(0.5)
    assert kind.check(0) == 0.0 and kind.check(0.49) == 0.49
    for bad in (0.5, -0.01, math.nan, True, "0.1"):
        assert reason(kind, bad) == f"must be a fraction from 0 to 0.5, got {bad!r}"


def test_choice() -> None:
    kind = Choice(("auto", "always", "never"), index=True)
    assert kind.check("ALWAYS") == "always"
    assert kind.native("never") == 2
    assert Choice(("a", "b")).native("b") == "b"
    for bad in ("maybe", None, 1):
        assert reason(kind, bad) == f"must be one of auto, always, never; got {bad!r}"


def test_flag_text_and_paths() -> None:
    assert Flag().check(True) is True
    for bad in (1, "true", None):
        assert reason(Flag(), bad) == f"must be true or false, got {bad!r}"
    assert Text().check("x") == "x"
    assert reason(Text(), "") == "must be a non-empty string, got ''"
    for kind in (File(), Directory()):
        assert kind.check(None) is None and kind.check("/x") == "/x"
        assert reason(kind, "") == "must be a path, got ''"
        assert reason(kind, 1) == "must be a path, got 1"
    assert (File.metavar, Directory.metavar) == ("FILE", "DIR")


def test_build_config_refuses_what_is_no_setting() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'config'"):
        build_config(config="x.toml")
    with pytest.raises(TypeError, match="unexpected keyword argument 'listen_port'"):
        build_config(listen_port=1)
    with pytest.raises(ConfigError) as info:
        build_config(listen="nope")
    assert info.value.field == "listen"
