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
from elbasy.ca import default_data_dir
from elbasy.cli import build_config, main
from elbasy.config import Config, ConfigError, ConnectTo
from elbasy.tls import openssl_version

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
    first, second = result.output.splitlines()
    assert first == f"elbasy {elbasy.__version__}"
    # the OpenSSL elbasy's binding runs with, and the file it came from
    assert second.startswith(f"{openssl_version()} (/"), second
    assert "libssl" in second


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
    "transparent": [],
    "intercept": [],
    "data_dir": str(default_data_dir()),  # show-config says where the CA lives
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
            "--transparent=:9443",
            "--transparent",
            "[::1]:9444",
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
        "transparent": ["0.0.0.0:9443", "[::1]:9444"],
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
        "ELBASY_TRANSPARENT": "127.0.0.1:9443",
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
        "transparent": ["127.0.0.1:9443"],
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
    assert proc.stdout.splitlines()[0] == f"elbasy {elbasy.__version__}"
    assert proc.stdout.splitlines()[1].startswith("OpenSSL 3.")


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


# --------------------------------------------------------------------------- options after


def test_options_after_the_subcommand_mean_the_same() -> None:
    assert settings(["--listen", ":9000"]) == {**DEFAULTS, "listen": "0.0.0.0:9000"}
    result = invoke(["show-config", "--listen", ":9000", "--max-wait=5", "--retry-idempotent"])
    assert result.exit_code == 0, result.output
    got = tomllib.loads(result.stdout)
    assert got == {**DEFAULTS, "listen": "0.0.0.0:9000", "max_wait": 5.0, "retry_idempotent": True}
    # after wins over the environment, like the command line before the subcommand
    result = invoke(["show-config", "--listen", ":9001"], {"ELBASY_LISTEN": ":9002"})
    assert tomllib.loads(result.stdout)["listen"] == "0.0.0.0:9001"
    # repeatable options add up, before and after
    result = invoke(["--connect-to", "a:1:b:2", "show-config", "--connect-to", "c:3:d:4"])
    assert tomllib.loads(result.stdout)["connect_to"] == ["a:1:b:2", "c:3:d:4"]
    # the other subcommands take them too
    listed = invoke(["rules", "list", "--rules", "etsy-v3"])
    assert listed.exit_code == 0, listed.output
    assert [ln.split()[0] for ln in listed.output.splitlines() if " yes " in ln] == ["etsy-v3"]


def test_an_option_after_the_subcommand_errs_in_one_line() -> None:
    line = one_line_error(invoke(["show-config", "--listen", "nope"]))
    assert line == (
        "Error: invalid value for --listen: invalid listen address 'nope': "
        "expected HOST:PORT, e.g. 127.0.0.1:8080"
    )
    result = invoke(["show-config", "--no-such-option"])
    assert result.exit_code == 2 and "No such option '--no-such-option'" in result.output


def test_a_config_file_after_the_subcommand(tmp_path: Path) -> None:
    path = write(tmp_path, 'listen = ":9000"\nmax_wait = 7\nrules = ["etsy-v3"]\n')
    result = invoke(["show-config", "--config", str(path)], {"ELBASY_MAX_WAIT": "9"})
    assert result.exit_code == 0, result.output
    got = tomllib.loads(result.stdout)
    # the file's settings, under the environment's
    assert (got["listen"], got["max_wait"], got["rules"]) == ("0.0.0.0:9000", 9.0, ["etsy-v3"])
    bad = write(tmp_path, "max_head_bytes = 5\n")
    line = one_line_error(invoke(["show-config", "--config", str(bad)]))
    assert line.startswith("Error: invalid value for --max-head-bytes (from the config file): ")


def test_data_dir_before_ca_init_is_the_ca_s(tmp_path: Path) -> None:
    """`elbasy --data-dir D ca init` makes the CA in D, as `elbasy ca init --data-dir D` does
    (it used the default data dir), and the environment and config file name it too."""
    home = tmp_path / "home"
    env = {"XDG_DATA_HOME": str(home)}
    d = tmp_path / "d"
    result = invoke(["--data-dir", str(d), "ca", "init", "--intercept", "*.a.test"], env)
    assert result.exit_code == 0, result.output
    assert f"Created a CA in {d}." in result.stdout
    assert (d / "ca.pem").exists() and not home.exists()
    # the same CA, however the data dir is given
    shown = invoke(["ca", "show", "--data-dir", str(d)], env).stdout
    assert f"certificate: {d / 'ca.pem'}" in shown
    assert invoke(["--data-dir", str(d), "ca", "show"], env).stdout == shown
    assert invoke(["ca", "show"], {**env, "ELBASY_DATA_DIR": str(d)}).stdout == shown
    path = write(tmp_path, f"data_dir = {str(d)!r}\n")
    assert invoke(["--config", str(path), "ca", "show"], env).stdout == shown
    assert invoke(["ca", "show", "--config", str(path)], env).stdout == shown
    # the subcommand's own option wins over the environment
    other = tmp_path / "other"
    result = invoke(["ca", "show", "--data-dir", str(other)], {**env, "ELBASY_DATA_DIR": str(d)})
    assert result.exit_code == 1 and f"no CA in {other}" in result.stderr


def test_intercept_before_ca_init_is_the_ca_s(tmp_path: Path) -> None:
    d = tmp_path / "d"
    result = invoke(["--data-dir", str(d), "--intercept", "*.b.test", "ca", "init"])
    assert result.exit_code == 0, result.output
    assert "intercept '*.b.test': permits b.test" in result.stdout
    env = {"ELBASY_INTERCEPT": "x.c.test"}
    result = invoke(["ca", "init", "--data-dir", str(tmp_path / "e")], env)
    assert result.exit_code == 0, result.output
    assert "intercept 'x.c.test': permits x.c.test" in result.stdout


# --------------------------------------------------------------------------- show-config


def test_show_config_says_what_every_unset_setting_means(tmp_path: Path) -> None:
    home = tmp_path / "share"
    result = invoke(["show-config"], {"XDG_DATA_HOME": str(home)})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    # where the CA lives, as a setting that reads back
    assert f'data_dir = "{home / "elbasy"}"' in lines
    assert "# upstream_ca: not set (the system's roots only)" in lines
    assert "# rules: not set (every rule)" in lines
    assert "# log_file: not set (stderr)" in lines
    from elbasy.config import SETTINGS

    for s in SETTINGS:
        if s.toml and s.name != "rule":  # every setting but the [[rule]] tables, once
            said = [ln for ln in lines if ln.startswith((f"{s.name} = ", f"# {s.name}: "))]
            assert len(said) == 1, s.name
    given = invoke(["--data-dir", str(tmp_path / "d"), "show-config"]).stdout
    assert f'data_dir = "{tmp_path / "d"}"' in given.splitlines()


# --------------------------------------------------------------------------- typos


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_wiat = 3\n", ": unknown key 'max_wiat' (did you mean 'max_wait'?)"),
        ("max-wiat = 3\n", ": unknown key 'max-wiat' (did you mean 'max-wait'?)"),
        ("log-levle = 'debug'\n", ": unknown key 'log-levle' (did you mean 'log-level'?)"),
        ("threads = 4\n", ": unknown key 'threads' (`elbasy show-config` prints every key)"),
        ('max-head-bytes = "big"\n', ", key 'max-head-bytes': expected integer, got 'big'"),
    ],
)
def test_config_file_errors_use_the_file_s_spelling(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path, text)
    line = one_line_error(invoke(["--config", str(path)]))
    assert line == f"Error: config file {str(path)!r}{message}"


def test_unknown_environment_variables_are_warned_about() -> None:
    result = invoke(
        ["show-config"],
        {
            "ELBASY_MAX_WIAT": "3",
            "ELBASY_ZZZ": "1",
            "ELBASY_REDIS_PASSWORD": "s",
            "ELBASY_MAX_WAIT": "4",
        },
    )
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        "Warning: ignoring the environment variable ELBASY_MAX_WIAT: no such setting; "
        "did you mean ELBASY_MAX_WAIT?",
        "Warning: ignoring the environment variable ELBASY_ZZZ: no such setting "
        "(see `elbasy --help`)",
    ]
    assert tomllib.loads(result.stdout)["max_wait"] == 4.0
    # the variable --auth-env names is elbasy's to read
    quiet = invoke(["--auth-env", "ELBASY_TOKENS", "show-config"], {"ELBASY_TOKENS": "t"})
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_python_m_elbasy_warns_of_an_unknown_environment_variable(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELBASY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["ELBASY_MAX_WIAT"] = "5"
    proc = subprocess.run(
        [sys.executable, "-m", "elbasy", "rules", "list"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == (
        "Warning: ignoring the environment variable ELBASY_MAX_WIAT: no such setting; "
        "did you mean ELBASY_MAX_WAIT?\n"
    )
    # the table fits the 100 columns of a terminal elbasy cannot measure
    assert max(len(line) for line in proc.stdout.splitlines()) <= 100
