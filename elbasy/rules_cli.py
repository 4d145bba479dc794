"""``elbasy rules ...``: list, show and check the API rules (see :mod:`elbasy.rules`).

``list`` and ``show`` see the rules the proxy would run with: the built-ins,
the config file's ``[[rule]]`` tables, and ``--rules`` (given before the
subcommand: ``elbasy --rules shopify-admin-rest rules list``). None of them
starts the proxy.
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


def _hosts(hosts: tuple[str, ...] | list[str]) -> str:
    """The first two hosts, and how many more (`elbasy rules show` lists them all)."""
    shown = ",".join(hosts[:2])
    return shown + (f" (+{len(hosts) - 2})" if len(hosts) > 2 else "")


def _summary(rule: Rule) -> str:
    tier = rule.default_tier
    limits = [
        _describe_limit(spec.by_tier[tier or ""])
        + (
            f" (a request {spec.request_cost:g}, a mutation {spec.mutation_cost:g})"
            if spec.counts == "requests"
            else ""
        )
        for spec in rule.limits
    ]
    text = "; ".join(limits) or "no limits"
    if rule.tier_names:
        text += f" [{tier}; tiers: {', '.join(rule.tier_names)}]"
    return text


@click.group("rules")
def rules() -> None:
    """The API rules: which hosts elbasy paces, whose quota and which limits.

    Built-in rules ship with elbasy; a config file adds or replaces rules with
    [[rule]] tables of the same schema, and --rules picks a subset.
    """


@rules.command("list")
@click.pass_obj
def list_rules(config: Config) -> None:
    """One line per enabled rule: id, provider, hosts, limits (default tier)."""
    ruleset = config.ruleset()
    rows = [(r.id, r.provider, _hosts(r.hosts), _summary(r)) for r in ruleset]
    if not rows:
        click.echo("no rules enabled")
        return
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
        click.echo("  ".join([*cells, row[3]]))


@rules.command("show")
@click.argument("name")
@click.pass_obj
def show_rule(config: Config, name: str) -> None:
    """Print rule NAME as TOML, with the source of every number."""
    from elbasy.rules import RuleError, RuleSet, rule_to_toml

    ruleset = config.ruleset()
    try:
        rule = ruleset.get(name)
    except RuleError:
        raise _Failed(
            f"no enabled rule {name!r} (enabled: {', '.join(ruleset.ids()) or 'none'})"
        ) from None
    if rule.origin.startswith("builtin:"):
        _, text = RuleSet.builtin_rule_data(rule.id)
        click.echo(f"# built-in rule, {rule.origin}")
        click.echo(text, nl=False)
    else:
        click.echo(f"# user rule, from the {rule.origin}")
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
