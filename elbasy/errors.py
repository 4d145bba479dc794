"""elbasy's exceptions, split by whose fault a failure is.

`RemoteProtocolError` means a peer (client or upstream) sent something
elbasy must refuse; `status_hint` is what the client is told. Anything else
raised inside elbasy is ours, and becomes a 500 without killing the worker.
"""

from __future__ import annotations


class ElbasyError(Exception):
    """Base for every error elbasy raises on purpose."""


class RemoteProtocolError(ElbasyError):
    """The peer broke HTTP: answer `status_hint` and close."""

    def __init__(self, message: str, status_hint: int = 400) -> None:
        super().__init__(message)
        self.status_hint = status_hint


class LocalProtocolError(ElbasyError):
    """elbasy itself tried to do something HTTP does not allow (a bug)."""
