"""elbasy.cli: options, environment, config file, precedence and error reporting.

The proxy itself is never started here: `elbasy show-config` runs the same
option handling and prints the resulting settings instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import elbasy
from elbasy.cli import build_config, main
from elbasy.config import Config, ConfigError, ConnectTo

REPO = Path(__file__).resolve().parent.parent

OPTIONS = [
    "--listen",
    "--log-level",
    "--log-format",
    "--head-timeout",
    "--connect-timeout",
    "--idle-timeout",
    "--keepalive-timeout",
    "--response-timeout",
    "--max-head-bytes",
    "--connect-to",
    "--rules",
    "--config",
    "--version",
    "--help",
]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("ELBASY_"):
            monkeypatch.delenv(name)


def invoke(args: list[str], env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, args, env=env, prog_name="elbasy")


def settings(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """The effective settings for these options, read back from `show-config`."""
    result = invoke([*args, "show-config"], env)
    assert result.exit_code == 0, result.output
    return tomllib.loads(result.stdout)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "elbasy.toml"
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- build_config


def test_build_config_defaults_match_config() -> None:
    assert build_config() == Config()


def test_build_config_all_options() -> None:
    config = build_config(
        listen="[::1]:0",
        log_level="debug",
        log_format="json",
        head_timeout=1,
        connect_timeout=2.5,
        idle_timeout=3,
        keepalive_timeout=4,
        response_timeout=5,
        max_head_bytes=4096,
        connect_to=["a:443:127.0.0.1:8443", "::b:"],
    )
    assert config == Config(
        listen_host="::1",
        listen_port=0,
        log_level="debug",
        log_format="json",
        head_timeout=1.0,
        connect_timeout=2.5,
        idle_timeout=3.0,
        keepalive_timeout=4.0,
        response_timeout=5.0,
        max_head_bytes=4096,
        connect_to=(ConnectTo("a", 443, "127.0.0.1", 8443), ConnectTo("", None, "b", None)),
    )


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"listen": "nope"}, "listen", "expected HOST:PORT"),
        ({"connect_to": ["a:1:b:2", "a:1:b"]}, "connect_to", "invalid connect-to 'a:1:b'"),
        ({"head_timeout": 0.0}, "head_timeout", "> 0"),
        ({"max_head_bytes": 10}, "max_head_bytes", "from 1024"),
        ({"log_level": "loud"}, "log_level", "one of"),
    ],
)
def test_build_config_errors_name_the_option(
    kwargs: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(**kwargs)
    assert info.value.field == field
    assert message in str(info.value)


# --------------------------------------------------------------------------- help / version


def test_help_lists_every_option() -> None:
    result = invoke(["--help"])
    assert result.exit_code == 0
    for option in OPTIONS:
        assert option in result.output
    assert "ELBASY_<NAME>" in result.output
    assert "default: 127.0.0.1:8080" in result.output


def test_version() -> None:
    result = invoke(["--version"])
    assert result.exit_code == 0
    assert result.output == f"elbasy {elbasy.__version__}\n"


# --------------------------------------------------------------------------- precedence


DEFAULTS = {
    "listen": "127.0.0.1:8080",
    "log_level": "info",
    "log_format": "text",
    "access_log": "-",
    "metrics_top_accounts": 10,
    "workers": 1,
    "drain_timeout": 30.0,
    "head_timeout": 10.0,
    "connect_timeout": 10.0,
    "idle_timeout": 300.0,
    "keepalive_timeout": 60.0,
    "response_timeout": 60.0,
    "exchange_timeout": 300.0,
    "max_connections": 0,
    "max_client_connections": 0,
    "max_head_bytes": 65536,
    "splice": "auto",
    "connect_to": [],
    "reverse": [],
    "intercept": [],
    "allow_hosts": [],
    "deny_hosts": [],
    "allow_ports": ["443"],
    "allow_internal": [],
    "dns_timeout": 5.0,
    "unconstrained_ca": False,
    "leaf_mint_rate": 60,
    "leaf_mint_burst": 20,
    "leaf_cache_files": 1000,
    "max_wait": 30.0,
    "retry_idempotent": False,
    "quota_margin": 0.01,
    "quota_store": "auto",
    "quota_capacity": 65536,
    "quota_instances": 1,
    "quota_redis_timeout": 0.25,
}


def test_defaults() -> None:
    assert settings([]) == DEFAULTS


def test_every_option_from_the_command_line() -> None:
    got = settings(
        [
            "--listen=:9000",
            "--log-level=WARNING",
            "--log-format=json",
            "--head-timeout=1",
            "--connect-timeout=2",
            "--idle-timeout=3",
            "--keepalive-timeout=4",
            "--response-timeout=5",
            "--exchange-timeout=50",
            "--max-connections=5000",
            "--max-client-connections=100",
            "--max-head-bytes=2048",
            "--splice=never",
            "--reverse=127.0.0.1:9101=https://openapi.etsy.com:443",
            "--connect-to=a:443:[::1]:8443",
            "--connect-to",
            "*.b.com::c:",
            "--intercept=*.myshopify.com",
            "--intercept",
            "API.etsy.com",
            "--data-dir=/tmp/elbasy-data",
            "--upstream-ca=/tmp/extra.pem",
            "--unconstrained-ca",
            "--leaf-mint-rate=0",
            "--leaf-mint-burst=5",
            "--leaf-cache-files=50",
            "--rules=etsy-v3, github-rest",
            "--max-wait=12.5",
            "--retry-idempotent",
            "--quota-margin=0.05",
            "--quota-store=shm",
            "--quota-capacity=1024",
            "--quota-instances=3",
            "--quota-redis-timeout=0.5",
            "--log-file=/tmp/elbasy.log",
            "--access-log=/tmp/access.log",
            "--auth-file=/tmp/elbasy.auth",
            "--auth-env=PROXY_TOKENS",
            "--allow-clients=10.0.0.0/8, 192.168.1.7",
            "--workers=auto",
            "--drain-timeout=7.5",
            "--metrics-listen=:9100",
            "--metrics-top-accounts=3",
            "--allow-hosts=*.myshopify.com",
            "--deny-hosts",
            "Admin.example.com",
            "--allow-ports=443,8443",
            "--allow-ports",
            "9000-9100",
            "--allow-internal=localhost",
            "--dns-timeout=2.5",
        ]
    )
    assert got == {
        "listen": "0.0.0.0:9000",
        "log_level": "warning",
        "log_file": "/tmp/elbasy.log",
        "access_log": "/tmp/access.log",
        "auth_file": "/tmp/elbasy.auth",
        "auth_env": "PROXY_TOKENS",
        "allow_clients": ["10.0.0.0/8", "192.168.1.7/32"],
        "workers": "auto",
        "drain_timeout": 7.5,
        "log_format": "json",
        "head_timeout": 1.0,
        "connect_timeout": 2.0,
        "idle_timeout": 3.0,
        "keepalive_timeout": 4.0,
        "response_timeout": 5.0,
        "exchange_timeout": 50.0,
        "max_connections": 5000,
        "max_client_connections": 100,
        "max_head_bytes": 2048,
        "splice": "never",
        "connect_to": ["a:443:[::1]:8443", "*.b.com::c:"],
        "reverse": ["127.0.0.1:9101=https://openapi.etsy.com"],
        "intercept": ["*.myshopify.com", "api.etsy.com"],
        "data_dir": "/tmp/elbasy-data",
        "upstream_ca": "/tmp/extra.pem",
        "unconstrained_ca": True,
        "leaf_mint_rate": 0,
        "leaf_mint_burst": 5,
        "leaf_cache_files": 50,
        "rules": ["etsy-v3", "github-rest"],
        "max_wait": 12.5,
        "retry_idempotent": True,
        "quota_margin": 0.05,
        "quota_store": "shm",
        "quota_capacity": 1024,
        "quota_instances": 3,
        "quota_redis_timeout": 0.5,
        "metrics_listen": "0.0.0.0:9100",
        "metrics_top_accounts": 3,
        "allow_hosts": ["*.myshopify.com"],
        "deny_hosts": ["admin.example.com"],
        "allow_ports": ["443", "8443", "9000-9100"],
        "allow_internal": ["localhost"],
        "dns_timeout": 2.5,
    }


def test_every_option_from_the_environment() -> None:
    env = {
        "ELBASY_LISTEN": "[::1]:9001",
        "ELBASY_LOG_LEVEL": "debug",
        "ELBASY_LOG_FORMAT": "logfmt",
        "ELBASY_ACCESS_LOG": "off",
        "ELBASY_AUTH_FILE": "/etc/elbasy/auth",
        "ELBASY_AUTH_ENV": "TOKENS",
        "ELBASY_ALLOW_CLIENTS": "::1,fd00::/8",
        "ELBASY_HEAD_TIMEOUT": "1.5",
        "ELBASY_CONNECT_TIMEOUT": "2",
        "ELBASY_IDLE_TIMEOUT": "3",
        "ELBASY_KEEPALIVE_TIMEOUT": "4",
        "ELBASY_RESPONSE_TIMEOUT": "5",
        "ELBASY_EXCHANGE_TIMEOUT": "40.5",
        "ELBASY_MAX_CONNECTIONS": "6000",
        "ELBASY_MAX_CLIENT_CONNECTIONS": "0",
        "ELBASY_MAX_HEAD_BYTES": "4096",
        "ELBASY_SPLICE": "always",
        "ELBASY_CONNECT_TO": "a:443:127.0.0.1:8443  ::b:\n",
        "ELBASY_REVERSE": "127.0.0.1:9101=https://a.example.com [::1]:9102=http://b.example.com",
        "ELBASY_INTERCEPT": "*.myshopify.com api.etsy.com",
        "ELBASY_DATA_DIR": "/tmp/elbasy-data",
        "ELBASY_UPSTREAM_CA": "/tmp/extra.pem",
        "ELBASY_UNCONSTRAINED_CA": "1",
        "ELBASY_LEAF_MINT_RATE": "120",
        "ELBASY_LEAF_MINT_BURST": "1",
        "ELBASY_LEAF_CACHE_FILES": "10",
        "ELBASY_MAX_WAIT": "7",
        "ELBASY_RETRY_IDEMPOTENT": "1",
        "ELBASY_QUOTA_MARGIN": "0.02",
        "ELBASY_QUOTA_STORE": "shm",
        "ELBASY_QUOTA_CAPACITY": "100000",
        "ELBASY_QUOTA_INSTANCES": "4",
        "ELBASY_QUOTA_REDIS_TIMEOUT": "0.1",
        "ELBASY_WORKERS": "3",
        "ELBASY_DRAIN_TIMEOUT": "0",
        "ELBASY_RULES": "bigcommerce",
        "ELBASY_METRICS_LISTEN": "[::1]:9101",
        "ELBASY_METRICS_TOP_ACCOUNTS": "0",
        "ELBASY_ALLOW_HOSTS": "*.a.com *.b.com",
        "ELBASY_DENY_HOSTS": "x.a.com",
        "ELBASY_ALLOW_PORTS": "443 8000-8999",
        "ELBASY_ALLOW_INTERNAL": "db.internal",
        "ELBASY_DNS_TIMEOUT": "1",
    }
    assert settings([], env) == {
        "listen": "[::1]:9001",
        "log_level": "debug",
        "log_format": "logfmt",
        "access_log": "off",
        "auth_file": "/etc/elbasy/auth",
        "auth_env": "TOKENS",
        "allow_clients": ["::1/128", "fd00::/8"],
        "head_timeout": 1.5,
        "connect_timeout": 2.0,
        "idle_timeout": 3.0,
        "keepalive_timeout": 4.0,
        "response_timeout": 5.0,
        "exchange_timeout": 40.5,
        "max_connections": 6000,
        "max_client_connections": 0,
        "max_head_bytes": 4096,
        "splice": "always",
        "connect_to": ["a:443:127.0.0.1:8443", "::b:"],
        "reverse": ["127.0.0.1:9101=https://a.example.com", "[::1]:9102=http://b.example.com"],
        "intercept": ["*.myshopify.com", "api.etsy.com"],
        "data_dir": "/tmp/elbasy-data",
        "upstream_ca": "/tmp/extra.pem",
        "unconstrained_ca": True,
        "leaf_mint_rate": 120,
        "leaf_mint_burst": 1,
        "leaf_cache_files": 10,
        "rules": ["bigcommerce"],
        "max_wait": 7.0,
        "retry_idempotent": True,
        "quota_margin": 0.02,
        "quota_store": "shm",
        "quota_capacity": 100000,
        "quota_instances": 4,
        "quota_redis_timeout": 0.1,
        "workers": 3,
        "drain_timeout": 0.0,
        "metrics_listen": "[::1]:9101",
        "metrics_top_accounts": 0,
        "allow_hosts": ["*.a.com", "*.b.com"],
        "deny_hosts": ["x.a.com"],
        "allow_ports": ["443", "8000-8999"],
        "allow_internal": ["db.internal"],
        "dns_timeout": 1.0,
    }


def test_config_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
listen = "127.0.0.1:9000"
log-level = "debug"
idle_timeout = 30
max-head-bytes = 8192
connect_to = ["a:443:127.0.0.1:8443", "::b:"]
rules = ["etsy-v3", "shopify-admin-rest"]
""",
    )
    assert settings(["--config", str(path)]) == {
        **DEFAULTS,
        "listen": "127.0.0.1:9000",
        "log_level": "debug",
        "idle_timeout": 30.0,
        "max_head_bytes": 8192,
        "connect_to": ["a:443:127.0.0.1:8443", "::b:"],
        "rules": ["etsy-v3", "shopify-admin-rest"],
    }
    # the command line and the environment win over the file's rules too
    assert settings(["--config", str(path), "--rules", "github-rest"])["rules"] == ["github-rest"]
    got = settings(["--config", str(path)], {"ELBASY_RULES": "bigcommerce"})
    assert got["rules"] == ["bigcommerce"]
    # ELBASY_CONFIG names the file too
    assert settings([], {"ELBASY_CONFIG": str(path)})["listen"] == "127.0.0.1:9000"


def test_precedence_flag_env_file_default(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
listen = "127.0.0.1:1001"
log_level = "debug"
head_timeout = 1
connect_to = ["file:1:x:1"]
""",
    )
    env = {"ELBASY_LISTEN": "127.0.0.1:2002", "ELBASY_LOG_LEVEL": "warning"}
    got = settings(["--config", str(path), "--listen", "127.0.0.1:3003"], env)
    assert got["listen"] == "127.0.0.1:3003"  # flag beats env and file
    assert got["log_level"] == "warning"  # env beats file
    assert got["head_timeout"] == 1.0  # file beats default
    assert got["connect_timeout"] == 10.0  # default
    assert got["connect_to"] == ["file:1:x:1"]
    # a list option is replaced, never merged, by a higher source
    got = settings(["--config", str(path)], {"ELBASY_CONNECT_TO": "env:1:y:1"})
    assert got["connect_to"] == ["env:1:y:1"]
    got = settings(
        ["--config", str(path), "--connect-to", "cli:1:z:1"], {"ELBASY_CONNECT_TO": "env:1:y:1"}
    )
    assert got["connect_to"] == ["cli:1:z:1"]


def test_show_config_output_is_a_config_file(tmp_path: Path) -> None:
    first = invoke(["--listen", "[::1]:0", "--connect-to", "*.a.com:443:[::1]:8443", "show-config"])
    assert first.exit_code == 0
    path = write(tmp_path, first.stdout)
    second = invoke(["--config", str(path), "show-config"])
    assert second.exit_code == 0
    assert second.stdout == first.stdout


# --------------------------------------------------------------------------- errors


def one_line_error(result: Result) -> str:
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.output.splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ")
    return lines[0]


def test_bad_value_from_the_command_line() -> None:
    line = one_line_error(invoke(["--head-timeout", "0"]))
    assert line == (
        "Error: invalid value for --head-timeout: must be a finite number of seconds > 0, got 0.0"
    )
    line = one_line_error(invoke(["--max-head-bytes", "100"]))
    assert line.startswith(
        "Error: invalid value for --max-head-bytes: must be an integer from 1024"
    )


def test_bad_rules() -> None:
    line = one_line_error(invoke(["--rules", "etsy-v3,nope"]))
    assert line.startswith("Error: invalid value for --rules: unknown rule 'nope' (known: ")
    line = one_line_error(invoke([], {"ELBASY_RULES": "nope"}))
    assert line.startswith("Error: invalid value for --rules (from ELBASY_RULES): unknown rule")


def test_bad_rules_in_the_config_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'rules = ["nope"]\n')
    line = one_line_error(invoke(["--config", str(path)]))
    assert line.startswith("Error: invalid value for --rules (from the config file): unknown")


def test_bad_listen() -> None:
    line = one_line_error(invoke(["--listen", "::1:80"]))
    assert line == (
        "Error: invalid value for --listen: invalid listen address '::1:80': "
        "put an IPv6 address in brackets, e.g. [::1]:8080"
    )


def test_bad_connect_to() -> None:
    line = one_line_error(invoke(["--connect-to", "a:1:b:2", "--connect-to", "a:http:b:2"]))
    assert line == (
        "Error: invalid value for --connect-to: invalid connect-to 'a:http:b:2': "
        "PORT 'http' must be a port number from 1 to 65535, or empty"
    )


def test_bad_value_names_the_environment_variable() -> None:
    line = one_line_error(invoke([], {"ELBASY_IDLE_TIMEOUT": "-5"}))
    assert line.startswith("Error: invalid value for --idle-timeout (from ELBASY_IDLE_TIMEOUT): ")


def test_bad_value_names_the_config_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'connect_to = ["nope"]\n')
    line = one_line_error(invoke(["--config", str(path)]))
    assert line.startswith("Error: invalid value for --connect-to (from the config file): ")
    assert "'nope'" in line


def test_config_file_unknown_key(tmp_path: Path) -> None:
    path = write(tmp_path, 'listen = ":1"\nthreads = 4\n')
    line = one_line_error(invoke(["--config", str(path)]))
    assert f"config file {str(path)!r}: unknown key 'threads'" in line


def test_config_file_missing(tmp_path: Path) -> None:
    line = one_line_error(invoke(["--config", str(tmp_path / "missing.toml")]))
    assert "cannot read config file" in line
    assert "missing.toml" in line


def test_config_file_wrong_type(tmp_path: Path) -> None:
    path = write(tmp_path, 'max_head_bytes = "big"\n')
    line = one_line_error(invoke(["--config", str(path)]))
    assert "key 'max_head_bytes': expected integer, got 'big'" in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--log-level", "verbose"], "Invalid value for '--log-level'"),
        (["--log-format", "xml"], "Invalid value for '--log-format'"),
        (["--head-timeout", "soon"], "Invalid value for '--head-timeout'"),
        (["--max-head-bytes", "1.5"], "Invalid value for '--max-head-bytes'"),
        (["--listen"], "Option '--listen' requires an argument"),
        (["--no-such-option"], "--no-such-option"),
        (["no-such-command"], "No such command 'no-such-command'"),
    ],
)
def test_click_usage_errors(args: list[str], message: str) -> None:
    result = invoke(args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- real process


def run_elbasy(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELBASY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "elbasy", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_python_m_elbasy_version() -> None:
    proc = run_elbasy("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"elbasy {elbasy.__version__}\n"


def test_python_m_elbasy_bad_option_is_one_line() -> None:
    proc = run_elbasy("--connect-timeout", "-1")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == (
        "Error: invalid value for --connect-timeout: "
        "must be a finite number of seconds > 0, got -1.0\n"
    )


def test_python_m_elbasy_usage_error_has_no_traceback() -> None:
    proc = run_elbasy("--log-level", "loud")
    assert proc.returncode == 2
    assert "Invalid value for '--log-level'" in proc.stderr
    assert "Traceback" not in proc.stderr
