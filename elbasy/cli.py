"""The ``elbasy`` command.

``elbasy [OPTIONS]`` runs the proxy. Every option can also come from the
environment (``ELBASY_<NAME>``, e.g. ``ELBASY_LISTEN``; ``ELBASY_CONNECT_TO``
holds space-separated rules) and from a TOML file given with ``--config``
whose keys are the long option names (``listen = "127.0.0.1:9000"``,
``connect_to = ["api.example.com:443:127.0.0.1:8443"]``; ``rules = ["etsy-v3"]``
enables a subset of the API rules, and ``[[rule]]`` tables add or replace
rules, see :mod:`elbasy.rules`). The command line
wins over the environment, which wins over the file, which wins over the
defaults.

``main`` is a click group so that later subcommands (``elbasy ca ...``) share
these options; without a subcommand it runs the proxy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from elbasy import __version__
from elbasy.ca_cli import ca
from elbasy.config import (
    SPLICE_MODES,
    Config,
    ConfigError,
    ConnectTo,
    load_toml,
    parse_listen,
    to_toml,
)
from elbasy.rules_cli import rules as rules_group

__all__ = ["build_config", "main"]

_DEFAULTS = Config()
_F = TypeVar("_F", bound=Callable[..., Any])


def build_config(
    *,
    listen: str = _DEFAULTS.listen,
    log_level: str = _DEFAULTS.log_level,
    log_format: str = _DEFAULTS.log_format,
    head_timeout: float = _DEFAULTS.head_timeout,
    connect_timeout: float = _DEFAULTS.connect_timeout,
    idle_timeout: float = _DEFAULTS.idle_timeout,
    keepalive_timeout: float = _DEFAULTS.keepalive_timeout,
    response_timeout: float = _DEFAULTS.response_timeout,
    max_head_bytes: int = _DEFAULTS.max_head_bytes,
    splice: str = _DEFAULTS.splice,
    connect_to: Iterable[str] = (),
    intercept: Iterable[str] = (),
    data_dir: str | None = None,
    upstream_ca: str | None = None,
    unconstrained_ca: bool = False,
    rules: str | Iterable[str] | None = None,
    rule: Sequence[Mapping[str, Any]] = (),
    max_wait: float = _DEFAULTS.max_wait,
    retry_idempotent: bool = _DEFAULTS.retry_idempotent,
    quota_margin: float = _DEFAULTS.quota_margin,
) -> Config:
    """A :class:`Config` from settings spelled as ``elbasy``'s options.

    ``rules`` is ``--rules``: ids separated by commas (or a list of them);
    None enables every rule. ``rule`` holds the config file's ``[[rule]]`` tables.

    Raises :class:`ConfigError` whose ``field`` is the option's name.
    """
    host, port = parse_listen(listen)
    connect_rules: list[ConnectTo] = []
    for spec in connect_to:
        try:
            connect_rules.append(ConnectTo.parse(spec))
        except ConfigError as e:
            raise ConfigError(e.reason, "connect_to") from None
    return Config(
        listen_host=host,
        listen_port=port,
        log_level=log_level,
        log_format=log_format,
        head_timeout=head_timeout,
        connect_timeout=connect_timeout,
        idle_timeout=idle_timeout,
        keepalive_timeout=keepalive_timeout,
        response_timeout=response_timeout,
        max_head_bytes=max_head_bytes,
        splice=splice,
        connect_to=tuple(connect_rules),
        intercept=tuple(intercept),
        data_dir=str(data_dir) if data_dir is not None else None,
        upstream_ca=upstream_ca,
        unconstrained_ca=unconstrained_ca,
        rules=_rule_ids(rules),
        rule=tuple(rule),
        max_wait=max_wait,
        retry_idempotent=retry_idempotent,
        quota_margin=quota_margin,
    )


def _rule_ids(value: str | Iterable[str] | None) -> tuple[str, ...] | None:
    """``--rules a,b`` (or a config file's ``["a", "b"]``) as ids; None: every rule."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    return tuple(i.strip() for item in items for i in item.split(",") if i.strip())


class ConfigProblem(click.ClickException):
    """A bad setting: printed as one ``Error: ...`` line, exit code 2."""

    exit_code = 2


_SOURCES = {
    ParameterSource.COMMANDLINE: "",
    ParameterSource.ENVIRONMENT: " (from ${envvar})",
    ParameterSource.DEFAULT_MAP: " (from the config file)",
    ParameterSource.DEFAULT: " (the default)",
}


def _problem(ctx: click.Context, error: ConfigError) -> ConfigProblem:
    """Turn a ConfigError into a one-line click error naming the option and its source."""
    name = error.field
    if name in ("listen_host", "listen_port"):
        name = "listen"
    param = next((p for p in ctx.command.params if p.name == name), None)
    if param is None or not isinstance(param, click.Option):
        return ConfigProblem(str(error))
    source = ctx.get_parameter_source(param.name or "")
    where = _SOURCES.get(source, "") if source is not None else ""
    if name == "rules" and source == ParameterSource.DEFAULT and _FILE_RULE_IDS in ctx.meta:
        where = _SOURCES[ParameterSource.DEFAULT_MAP]
    where = where.replace("${envvar}", str(param.envvar))
    return ConfigProblem(f"invalid value for {param.opts[0]}{where}: {error.reason}")


def _load_config_file(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """Eager callback of ``--config``: the file's settings become the defaults."""
    if not value:
        return
    try:
        settings = load_toml(value)
    except ConfigError as e:
        raise ConfigProblem(str(e)) from None
    # user rules are no option: checked here, against the file's name, and kept aside
    tables = settings.pop("rule", [])
    if tables:
        from elbasy.rules import RuleError, parse_rule

        for table in tables:
            try:
                parse_rule(table, f"config file {value!r}")
            except RuleError as e:
                raise ConfigProblem(str(e)) from None
    ctx.meta[_USER_RULES] = tables
    # "rules" cannot sit in default_map: click reads a key named like a
    # subcommand (`elbasy rules`) as that subcommand's defaults
    if "rules" in settings:
        ctx.meta[_FILE_RULE_IDS] = settings.pop("rules")
    ctx.default_map = {**settings, **(ctx.default_map or {})}


_USER_RULES = "elbasy.user_rules"
_FILE_RULE_IDS = "elbasy.file_rule_ids"


def _env(name: str) -> str:
    return "ELBASY_" + name.upper()


def _seconds(name: str, default: float, help: str) -> Callable[[_F], _F]:
    return click.option(
        "--" + name.replace("_", "-"),
        name,
        type=float,
        default=default,
        show_default=True,
        envvar=_env(name),
        metavar="SECONDS",
        help=help,
    )


@click.group(
    invoke_without_command=True,
    subcommand_metavar="[COMMAND [ARGS]...]",
    context_settings={"show_default": True},
)
@click.version_option(__version__, "--version", prog_name="elbasy", message="%(prog)s %(version)s")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    envvar=_env("config"),
    is_eager=True,
    expose_value=False,
    callback=_load_config_file,
    metavar="FILE",
    help="TOML file whose keys are these options' long names (listen, connect_to, ...).",
)
@click.option(
    "--listen",
    "listen",
    default=_DEFAULTS.listen,
    envvar=_env("listen"),
    metavar="HOST:PORT",
    help="Address to accept clients on; port 0 picks a free port, ':PORT' means all interfaces.",
)
@click.option(
    "--log-level",
    "log_level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default=_DEFAULTS.log_level,
    envvar=_env("log_level"),
)
@click.option(
    "--log-format",
    "log_format",
    type=click.Choice(["text", "json"], case_sensitive=False),
    default=_DEFAULTS.log_format,
    envvar=_env("log_format"),
)
@_seconds("head_timeout", _DEFAULTS.head_timeout, "Close clients whose request head is late.")
@_seconds("connect_timeout", _DEFAULTS.connect_timeout, "Give up dialing upstream (504).")
@_seconds("idle_timeout", _DEFAULTS.idle_timeout, "Close CONNECT tunnels idle this long.")
@_seconds(
    "keepalive_timeout",
    _DEFAULTS.keepalive_timeout,
    "Close idle keep-alive client and pooled upstream connections.",
)
@_seconds(
    "response_timeout",
    _DEFAULTS.response_timeout,
    "Wait this long for an upstream response head (504).",
)
@click.option(
    "--max-head-bytes",
    "max_head_bytes",
    type=int,
    default=_DEFAULTS.max_head_bytes,
    envvar=_env("max_head_bytes"),
    metavar="N",
    help="Largest request head accepted (431 beyond).",
)
@click.option(
    "--splice",
    "splice",
    type=click.Choice(list(SPLICE_MODES), case_sensitive=False),
    default=_DEFAULTS.splice,
    envvar=_env("splice"),
    help="How tunnels move bytes: auto copies small messages and splices bulk flows.",
)
@click.option(
    "--connect-to",
    "connect_to",
    multiple=True,
    envvar=_env("connect_to"),
    metavar="HOST:PORT:ADDR:PORT",
    show_default=False,
    help="Dial ADDR:PORT for HOST:PORT (curl syntax; HOST is a glob; empty fields mean "
    "any/keep; IPv6 in brackets). Repeatable; the first match wins.",
)
@click.option(
    "--intercept",
    "intercept",
    multiple=True,
    envvar=_env("intercept"),
    metavar="GLOB",
    show_default=False,
    help="Terminate TLS for CONNECTs to hosts matching GLOB (e.g. '*.myshopify.com') and "
    "relay each request; repeatable. Other hosts get a spliced tunnel.",
)
@click.option(
    "--data-dir",
    "data_dir",
    type=click.Path(file_okay=False),
    default=None,
    envvar=_env("data_dir"),
    metavar="DIR",
    show_default=False,
    help="Where the CA lives (made on first run). [default: $XDG_DATA_HOME/elbasy]",
)
@click.option(
    "--upstream-ca",
    "upstream_ca",
    type=click.Path(dir_okay=False),
    default=None,
    envvar=_env("upstream_ca"),
    metavar="FILE",
    show_default=False,
    help="Also trust these CA certificates (PEM) when verifying upstream TLS.",
)
@click.option(
    "--unconstrained-ca",
    "unconstrained_ca",
    is_flag=True,
    default=False,
    envvar=_env("unconstrained_ca"),
    help="On first run, make a CA without name constraints (it can issue for ANY host).",
)
@click.option(
    "--rules",
    "rules",
    default=None,
    envvar=_env("rules"),
    metavar="ID,ID",
    show_default=False,
    help="Enable only these API rules (see `elbasy rules list`). [default: every rule]",
)
@_seconds(
    "max_wait",
    _DEFAULTS.max_wait,
    "Longest a request waits for its quota; beyond it elbasy answers 429 with Retry-After "
    "(per request: X-Elbasy-Max-Wait).",
)
@click.option(
    "--retry-idempotent/--no-retry-idempotent",
    "retry_idempotent",
    default=_DEFAULTS.retry_idempotent,
    envvar=_env("retry_idempotent"),
    help="Send an idempotent request the API refused with 429 once more after the wait, "
    "so the client never sees the 429.",
)
@click.option(
    "--quota-margin",
    "quota_margin",
    type=float,
    default=_DEFAULTS.quota_margin,
    envvar=_env("quota_margin"),
    metavar="FRACTION",
    help="Part of each limit's rate left unused against network jitter.",
)
@click.pass_context
def main(ctx: click.Context, /, **options: Any) -> None:
    """elbasy: an egress HTTP(S) proxy that keeps API clients under their rate limits.

    Every option can also be set as ELBASY_<NAME> in the environment (e.g.
    ELBASY_LISTEN; ELBASY_CONNECT_TO takes space-separated rules) or in the
    --config file. Precedence: command line, environment, config file, defaults.
    """
    if _FILE_RULE_IDS in ctx.meta and ctx.get_parameter_source("rules") in (
        ParameterSource.DEFAULT,
        None,
    ):
        options["rules"] = ctx.meta[_FILE_RULE_IDS]
    try:
        config = build_config(**options, rule=ctx.meta.get(_USER_RULES, ()))
    except ConfigError as e:
        raise _problem(ctx, e) from None
    ctx.obj = config
    if ctx.invoked_subcommand is not None:
        return

    from elbasy.logs import configure
    from elbasy.server import StartupError, run

    configure(config.log_level, config.log_format)
    try:
        run(config)
    except StartupError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:  # Ctrl-C before the server installed its handlers
        pass


@main.command("show-config")
@click.pass_obj
def show_config(config: Config) -> None:
    """Print the effective settings as a TOML config file, then exit."""
    click.echo(to_toml(config), nl=False)


main.add_command(ca)
main.add_command(rules_group)
