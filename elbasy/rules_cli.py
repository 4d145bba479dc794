"""``elbasy rules ...``: list, show and check the API rules (see :mod:`elbasy.rules`).

``list`` and ``show`` see the rules the proxy would run with: the built-ins,
the config file's ``[[rule]]`` tables, and ``--rules`` (before or after the
subcommand: ``elbasy --rules shopify-admin-rest rules list``). ``list`` is a
table of every rule, enabled or not, that fits the terminal (80 to 120
columns); ``show`` prints a disabled rule too. None of them starts the proxy.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from elbasy.config import Config
    from elbasy.limits import Limit
    from elbasy.rules import Rule

__all__ = ["rules"]


class _Failed(click.ClickException):
    """A rules problem: ``Error: ...``, exit code 1."""


def _describe_limit(limit: Limit) -> str:
    if limit.kind == "bucket":
        numbers = f"{limit.capacity:g} @ {limit.rate:g}/s"
    elif limit.kind == "window":
        numbers = f"{limit.capacity:g} per {limit.window:g}s"
    else:
        numbers = f"{limit.capacity:g} per rolling {limit.window:g}s ({limit.sub_buckets} parts)"
    unit = "" if limit.unit == "requests" else f" {limit.unit}"
    return f"{limit.name} {numbers}{unit}"


def _numbers(limit: Limit) -> str:
    """A limit's numbers without its name, for the table (``10000 per rolling 86400s``)."""
    text = _describe_limit(limit)
    text = text.split(" ", 1)[1]
    return text.split(" (", 1)[0] + text.split(")", 1)[1] if " (" in text else text


def _fit(items: list[str], width: int) -> str:
    """As many of ``items`` as fit in ``width``, then how many more."""
    from elbasy.hostglob import some_hosts

    return some_hosts(items, width, at_least=0)


def _limits_cell(rule: Rule, width: int) -> str:
    """The default tier's limits in ``width`` characters: named if they fit, else their
    numbers, else the first one cut short."""
    limits = [spec.by_tier[rule.default_tier or ""] for spec in rule.limits]
    if not limits:
        return "no limits"
    for items in ([_describe_limit(x) for x in limits], [_numbers(x) for x in limits]):
        text = _fit(items, width)
        if text:
            return text
    first = _numbers(limits[0])
    return first if len(first) <= width else first[: max(width - 3, 1)] + "..."


def _columns() -> int:
    """The table's width: the terminal's, within 80 to 120 columns (100 when unknown)."""
    import shutil

    return min(max(shutil.get_terminal_size((100, 24)).columns, 80), 120)


@click.group("rules")
def rules() -> None:
    """The API rules: which hosts elbasy paces, whose quota and which limits.

    Built-in rules ship with elbasy; a config file adds or replaces rules with
    [[rule]] tables of the same schema, and --rules picks a subset.
    """


@rules.command("list")
@click.pass_obj
def list_rules(config: Config) -> None:
    """A table of the rules: enabled or not (--rules), hosts, limits (default tier)."""
    from elbasy.rules import RuleSet

    width = _columns()
    every = RuleSet.load(None, config.rule)
    enabled = set(config.ruleset().ids())
    name_width = max(len(r.id) for r in every)
    # the hosts get what leaves the limits 24 columns; at 100 columns and more, all they need
    hosts_width = max(16, width - name_width - len("yes") - 3 * 2 - 24)
    header = ("RULE", "ON", "HOSTS")
    rows = [(r.id, "yes" if r.id in enabled else "no", _hosts_cell(r, hosts_width)) for r in every]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    room = width - sum(widths) - 2 * len(widths)
    lines = [(*header, "LIMITS (default tier)")]
    lines += [(*row, _limits_cell(r, room)) for row, r in zip(rows, every, strict=True)]
    for line in lines:
        cells = [cell.ljust(w) for cell, w in zip(line, widths, strict=False)]
        click.echo("  ".join([*cells, line[3]]).rstrip())


def _hosts_cell(rule: Rule, width: int) -> str:
    """The first hosts and how many more, in ``width`` characters."""
    from elbasy.hostglob import some_hosts

    text = some_hosts(rule.hosts, width)
    if len(text) <= width:
        return text
    more = f" +{len(rule.hosts) - 1} more" if len(rule.hosts) > 1 else ""
    return rule.hosts[0][: max(width - len(more) - 3, 1)] + "..." + more


@rules.command("show")
@click.argument("name")
@click.pass_obj
def show_rule(config: Config, name: str) -> None:
    """Print rule NAME as TOML, with the source of every number; a disabled rule too."""
    from elbasy.rules import RuleError, RuleSet, rule_to_toml

    every = RuleSet.load(None, config.rule)
    try:
        rule = every.get(name)
    except RuleError:
        from elbasy.config import did_you_mean

        guess = did_you_mean(name, every.ids())
        hint = f"did you mean {guess!r}?" if guess else f"rules: {', '.join(every.ids())}"
        raise _Failed(f"no rule {name!r} ({hint})") from None
    enabled = name in config.ruleset().ids()
    state = "" if enabled else "; disabled (not in --rules)"
    if rule.origin.startswith("builtin:"):
        _, text = RuleSet.builtin_rule_data(rule.id)
        click.echo(f"# built-in rule, {rule.origin}{state}")
        click.echo(text, nl=False)
    else:
        click.echo(f"# user rule, from the {rule.origin}{state}")
        click.echo(rule_to_toml(rule.data), nl=False)


@rules.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def check_rules(file: Path) -> None:
    """Check a TOML file of rules ([[rule]] tables, or one rule); exit 1 on errors."""
    from elbasy.rules import RuleError, RuleSet

    try:
        checked = RuleSet.check_file(file)
    except RuleError as e:
        for line in str(e).splitlines():
            click.echo(f"error: {line}", err=True)
        raise SystemExit(1) from None
    click.echo(f"ok: {len(checked)} rule{'s' if len(checked) != 1 else ''}")
