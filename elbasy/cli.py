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

``main`` is a click group so that its subcommands (``elbasy ca ...``,
``elbasy rules ...``, ``elbasy show-config``) share these options; without a
subcommand it runs the proxy. The options may also follow a subcommand, with
the same meaning (``elbasy show-config --listen :9000``): every subcommand
takes hidden copies of them (:func:`_settings_after_subcommands`).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from elbasy import __version__
from elbasy.ca_cli import ca
from elbasy.config import (
    SETTINGS,
    Config,
    ConfigError,
    build_config,
    load_toml,
    setting_named,
    to_toml,
    unknown_environment,
)
from elbasy.rules_cli import rules as rules_group
from elbasy.settings import Choice, ChoiceOrURL, ConfigFile, Directory, File, Flag, Setting

__all__ = ["build_config", "main"]

_DEFAULTS = Config()
_F = TypeVar("_F", bound=Callable[..., Any])


class ConfigProblem(click.ClickException):
    """A bad setting: printed as one ``Error: ...`` line, exit code 2."""

    exit_code = 2


#: ctx.meta keys: a config file's settings that have no option (the [[rule]]
#: tables), and those kept out of click's default_map (see _load_config_file)
_FILE_ONLY = "elbasy.file_only_settings"
_FILE_ASIDE = "elbasy.file_settings_aside"
#: ctx.meta key: the settings given after a subcommand (`elbasy show-config --listen X`)
_AFTER = "elbasy.settings_after_the_command"

_SOURCES = {
    ParameterSource.COMMANDLINE: "",
    ParameterSource.ENVIRONMENT: " (from ${envvar})",
    ParameterSource.DEFAULT_MAP: " (from the config file)",
    ParameterSource.DEFAULT: " (the default)",
}


def _problem(ctx: click.Context, error: ConfigError) -> ConfigProblem:
    """Turn a ConfigError into a one-line click error naming the option and its source."""
    owner = setting_named(error.field)
    name = owner.name if owner is not None else None
    param = next((p for p in ctx.command.params if p.name == name), None)
    if param is None or not isinstance(param, click.Option):
        return ConfigProblem(str(error))
    source = ctx.get_parameter_source(param.name or "")
    where = _SOURCES.get(source, "") if source is not None else ""
    if source == ParameterSource.DEFAULT and name in ctx.meta.get(_FILE_ASIDE, {}):
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
    only_here: dict[str, Any] = {}
    aside: dict[str, Any] = {}
    commands = ctx.command.commands if isinstance(ctx.command, click.Group) else {}
    for s in SETTINGS:
        if s.name not in settings:
            continue
        if not s.option:
            # no option (the [[rule]] tables): checked here, against the file's name
            try:
                only_here[s.name] = s.kind.from_file(settings.pop(s.name), f"config file {value!r}")
            except ConfigError as e:
                raise ConfigProblem(str(e)) from None
        elif s.name in commands:
            # cannot sit in default_map: click reads a key named like a subcommand
            # (`elbasy rules`) as that subcommand's defaults; main() applies it
            aside[s.name] = settings.pop(s.name)
    ctx.meta[_FILE_ONLY] = only_here
    ctx.meta[_FILE_ASIDE] = aside
    ctx.default_map = {**settings, **(ctx.default_map or {})}


def _option(s: Setting, after: bool = False) -> Callable[[_F], _F]:
    """The click option of setting ``s``: ``--name``, ``ELBASY_NAME``, its help and default.

    ``after``: its copy that a subcommand takes (``elbasy show-config --listen X``),
    hidden, without the environment variable (``main`` reads it), kept in ctx.meta.
    """
    kind = s.kind
    attrs: dict[str, Any] = {"envvar": s.envvar, "metavar": s.option_metavar, "help": s.help}
    if after:
        attrs = {"metavar": s.option_metavar, "hidden": True, "expose_value": False}
        attrs["callback"] = _keep_after
    if s.default_text is not None:
        attrs["help"] = f"{s.help} [default: {s.default_text}]"
        attrs["show_default"] = False  # the text above says it, once
    decls = [s.flag]
    if isinstance(kind, Flag) and kind.negatable:
        decls = [f"{s.flag}/--no-{s.flag[2:]}"]
    elif isinstance(kind, Flag):
        attrs["is_flag"] = True
    elif isinstance(kind, Choice) and not isinstance(kind, ChoiceOrURL):
        attrs["type"] = click.Choice(list(kind.choices), case_sensitive=False)
    elif isinstance(kind, File):  # Directory and ConfigFile too
        directory = isinstance(kind, Directory)
        attrs["type"] = click.Path(file_okay=not directory, dir_okay=directory)
    elif kind.multiple:
        attrs["multiple"] = True
    elif kind.value_type is not str:
        attrs["type"] = kind.value_type
    if "type" not in attrs and not kind.multiple and not isinstance(kind, Flag):
        # text whatever the default looks like (--workers: 1 or auto)
        attrs["type"] = click.STRING
    if after:
        return click.option(*decls, s.name, **attrs)
    if isinstance(kind, ConfigFile):
        attrs.update(is_eager=True, expose_value=False, callback=_load_config_file)
        return click.option(*decls, s.name, **attrs)
    default = kind.dump(s, _DEFAULTS)
    attrs["default"] = tuple(default) if isinstance(default, list) else default
    if attrs["default"] in (None, ()):
        attrs["show_default"] = False
    return click.option(*decls, s.name, **attrs)


def _setting_options(f: _F) -> _F:
    """Every setting that has an option, as click options of ``f``, in table order."""
    for s in reversed(SETTINGS):
        if s.option:
            f = _option(s)(f)
    return f


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(f"elbasy {__version__}")
    try:
        from elbasy.tls import openssl_library, openssl_version
    except ImportError as e:  # a broken install: say so, --version is how one finds out
        click.echo(f"OpenSSL: elbasy's TLS binding does not load: {e}")
    else:
        where = openssl_library()
        click.echo(f"{openssl_version()}" + (f" ({where})" if where else ""))
    ctx.exit()


@click.group(
    invoke_without_command=True,
    subcommand_metavar="[COMMAND [ARGS]...]",
    context_settings={"show_default": True},
)
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show elbasy's version and the OpenSSL it runs with, and exit.",
)
@_setting_options
@click.pass_context
def main(ctx: click.Context, /, **options: Any) -> None:
    """elbasy: an egress HTTP(S) proxy that keeps API clients under their rate limits.

    Every option can also be set as ELBASY_<NAME> in the environment (e.g.
    ELBASY_LISTEN; ELBASY_CONNECT_TO takes space-separated rules) or in the
    --config file. Precedence: command line, environment, config file, defaults.
    """
    config = _config_of(ctx, options)
    ctx.obj = config
    for line in unknown_environment(os.environ, config):
        click.echo(f"Warning: {line}", err=True)
    if ctx.invoked_subcommand is not None:
        return

    from elbasy import supervisor
    from elbasy.logs import configure
    from elbasy.server import StartupError

    args = sys.argv[1:]
    try:
        configure(config.log_level, config.log_format, config.log_file, config.access_log)
    except OSError as e:
        raise click.ClickException(f"cannot open the log file {e.filename}: {e.strerror}") from None
    try:
        code = supervisor.run(config, lambda: reload_config(args))
    except StartupError as e:
        # a listener's address is a bad option (exit 2); anything else exit 1
        failed = ConfigProblem if e.exit_code == ConfigProblem.exit_code else click.ClickException
        raise failed(str(e)) from None
    except KeyboardInterrupt:  # Ctrl-C before the supervisor installed its handlers
        code = 0
    ctx.exit(code)


def _config_of(ctx: click.Context, options: dict[str, Any]) -> Config:
    """The Config of a parsed command line (its options, the config file's settings)."""
    for name, value in ctx.meta.get(_FILE_ASIDE, {}).items():
        if ctx.get_parameter_source(name) in (ParameterSource.DEFAULT, None):
            options[name] = value
    try:
        return build_config(**options, **ctx.meta.get(_FILE_ONLY, {}))
    except ConfigError as e:
        raise _problem(ctx, e) from None


def reload_config(args: list[str]) -> Config:
    """The settings of ``elbasy ARGS`` as they are now: the same command line, with the
    environment and the config file read again (SIGHUP). Raises ConfigError, one line."""
    try:
        with main.make_context("elbasy", list(args)) as ctx:
            return _config_of(ctx, dict(ctx.params))
    except click.exceptions.Exit as e:
        raise ConfigError(f"the command line asks for no proxy (exit {e.exit_code})") from None
    except click.ClickException as e:
        raise ConfigError(e.format_message()) from None


@main.command("show-config")
@click.pass_obj
def show_config(config: Config) -> None:
    """Print the effective settings as a TOML config file, then exit.

    A setting left unset is a comment saying what that means; the data dir
    is the directory it stands for (where the CA lives).
    """
    import dataclasses

    from elbasy.ca import default_data_dir

    if config.data_dir is None:
        config = dataclasses.replace(config, data_dir=str(default_data_dir()))
    click.echo(to_toml(config), nl=False)


main.add_command(ca)
main.add_command(rules_group)


# --------------------------------------------------------------------------- options after


def _keep_after(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """Callback of a setting's option after a subcommand: its value, for _after_config
    (which takes those given on the command line)."""
    if param.name:
        ctx.meta.setdefault(_AFTER, {})[param.name] = value


def _after_config(ctx: click.Context, after: dict[str, Any]) -> Config:
    """The Config of ``main``'s options with those given after the subcommand: these
    count as the command line, and a ``--config`` file among them as the config file."""
    root = ctx.find_root()
    options = dict(root.params)
    only_here = dict(ctx.meta.get(_FILE_ONLY, {}))
    from_file: set[str] = set()

    def source(name: str) -> ParameterSource | None:
        return root.get_parameter_source(name)

    for name, value in ctx.meta.get(_FILE_ASIDE, {}).items():
        if source(name) in (ParameterSource.DEFAULT, None):
            options[name] = value
    after = dict(after)
    path = after.pop("config", None)
    if path:
        try:
            settings = load_toml(path)
        except ConfigError as e:
            raise ConfigProblem(str(e)) from None
        for s in SETTINGS:
            if s.name not in settings:
                continue
            if not s.option:
                try:
                    only_here[s.name] = s.kind.from_file(settings[s.name], f"config file {path!r}")
                except ConfigError as e:
                    raise ConfigProblem(str(e)) from None
            elif source(s.name) not in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
                options[s.name] = settings[s.name]
                from_file.add(s.name)
    for name, value in after.items():
        owner = setting_named(name)
        before = source(name) == ParameterSource.COMMANDLINE
        if owner is not None and owner.kind.multiple and before:
            value = (*options[name], *value)  # repeatable: before and after add up
        options[name] = value
        from_file.discard(name)
    try:
        return build_config(**options, **only_here)
    except ConfigError as e:
        owner = setting_named(e.field)
        if owner is not None and owner.name in after:
            raise ConfigProblem(f"invalid value for {owner.flag}: {e.reason}") from None
        if owner is not None and owner.name in from_file:
            raise ConfigProblem(
                f"invalid value for {owner.flag} (from the config file): {e.reason}"
            ) from None
        raise _problem(root, e) from None


def _taking_settings_after(callback: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(callback)
    def run(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        after = {
            name: value
            for name, value in ctx.meta.pop(_AFTER, {}).items()
            if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE
        }
        if after:
            ctx.obj = _after_config(ctx, after)
        return callback(*args, **kwargs)

    return run


def _settings_after_subcommands(group: click.Group) -> None:
    """Let every subcommand of ``group`` (and theirs) take ``main``'s options after its
    name too (`elbasy show-config --listen X`, `elbasy rules list --rules a,b`), with the
    same meaning; an option of the subcommand's own (``ca init --intercept``) stays its."""
    for command in group.commands.values():
        if isinstance(command, click.Group):
            _settings_after_subcommands(command)
            continue
        own = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
        for s in SETTINGS:
            if s.option and s.flag not in own:
                _option(s, after=True)(command)
        if command.callback is not None:
            command.callback = _taking_settings_after(command.callback)
        if not command.epilog:
            command.epilog = "elbasy's options (see elbasy --help) may also follow the command."


_settings_after_subcommands(main)
