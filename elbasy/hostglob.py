"""Which host names an intercept glob covers: one label per glob label.

Interception (which CONNECTs get TLS terminated, :meth:`elbasy.policy.Policy.intercepts`)
and the leaves elbasy mints for them (:class:`elbasy.tls.ServerTLS`) ask the same
question with :func:`covered`, so a name is intercepted exactly when a leaf may
be minted for it.

A glob matches a name label by label: the same number of labels, each label
matched by :func:`fnmatch.fnmatchcase` (case-insensitive, so ``*`` and ``?``
never cross a dot). ``*.myshopify.com`` covers ``shop.myshopify.com`` but not
``myshopify.com`` nor ``n1.deep.myshopify.com``; ``shop.*.example.com``
covers ``shop.eu.example.com``; ``*`` alone covers the one-label names. This is
the depth a TLS wildcard certificate has too, so one ``*.myshopify.com`` leaf
serves every name the glob covers. A trailing dot is ignored on either side,
and an IPv6 literal is compared without its brackets.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase

__all__ = ["covered", "glob_covers", "some_hosts"]


def _labels(text: str) -> list[str]:
    text = text.strip().lower().rstrip(".")
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return text.split(".")


def glob_covers(glob: str, name: str) -> bool:
    """Whether host glob ``glob`` covers host ``name`` (one label per glob label)."""
    want, have = _labels(glob), _labels(name)
    if len(want) != len(have) or not name:
        return False
    return all(fnmatchcase(label, pattern) for label, pattern in zip(have, want, strict=True))


def covered(name: str, globs: Iterable[str]) -> bool:
    """Whether any of ``globs`` covers ``name``."""
    return any(glob_covers(glob, name) for glob in globs)


def some_hosts(hosts: Sequence[str], width: int, at_least: int = 1) -> str:
    """The first hosts, then how many more, in about ``width`` characters, at least
    ``at_least`` named (0 and none fits: ""):
    ``*.myshopify.com, openapi.etsy.com +10 more``."""
    shown = at_least
    while shown < len(hosts):
        more = len(hosts) - shown - 1
        text = ", ".join(hosts[: shown + 1]) + (f" +{more} more" if more else "")
        if len(text) > width:
            break
        shown += 1
    if shown == 0:
        return ""
    rest = len(hosts) - shown
    return ", ".join(hosts[:shown]) + (f" +{rest} more" if rest > 0 else "")
