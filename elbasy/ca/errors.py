"""The one exception of :mod:`elbasy.ca`, raised by each of its modules."""

from __future__ import annotations

from elbasy.errors import ElbasyError

__all__ = ["CAError"]


class CAError(ElbasyError):
    """The CA cannot be created, loaded or used; the message says why and what to do."""
