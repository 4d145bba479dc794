"""The rules database: which third-party APIs elbasy paces, and how.

A rule (one per API; the built-ins are TOML files in ``elbasy/rules/data``,
users add or override them in their config file) says how to recognise the
API's requests, whose quota a request spends, which limits apply with which
numbers for the account's plan, what a request costs, how to read the
server's view of the quota back from a response, and how the server says
"exceeded". The schema is described in :mod:`elbasy.rules.schema`.

Plain Python: no sockets, and no clock except the one handed in.
"""

from __future__ import annotations

from elbasy.rules.ruleset import BUILTIN_IDS, Match, Report, RuleSet
from elbasy.rules.schema import (
    HINT_HEADER,
    Rule,
    RuleError,
    check_rules,
    parse_rule,
    rule_to_toml,
)

__all__ = [
    "BUILTIN_IDS",
    "HINT_HEADER",
    "Match",
    "Report",
    "Rule",
    "RuleError",
    "RuleSet",
    "check_rules",
    "parse_rule",
    "rule_to_toml",
]
