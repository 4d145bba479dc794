"""What an API allows one quota account: the shared vocabulary of rules and quota.

A rule (``elbasy.rules``) says which limits apply to a request and with which
numbers for the account's plan; the quota engine (``elbasy.quota``) keeps
each account's clocks against them. Both speak in these small values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

#: A leaky or token bucket (the same meter): ``capacity`` units, ``rate`` units
#: restored per second. Kept as GCRA (one theoretical arrival time).
BUCKET: Final = "bucket"
#: A fixed window: at most ``capacity`` units per ``window`` seconds, windows
#: aligned to the epoch (Etsy's per-second limit, GitHub's hour).
WINDOW: Final = "window"
#: A rolling window of ``sub_buckets`` fixed sub-windows: at most ``capacity``
#: units in the current sub-window and the ``sub_buckets - 1`` before it
#: (Etsy's day of twelve two-hour blocks).
ROLLING: Final = "rolling"

LimitKind = Literal["bucket", "window", "rolling"]


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit on one quota account, with the numbers of the account's plan."""

    name: str  # e.g. "shopify-rest", "etsy-qps"; unique within a rule
    kind: LimitKind
    capacity: float  # bucket size, or units per window
    rate: float = 0.0  # bucket: units restored per second
    window: float = 0.0  # window and rolling: seconds
    sub_buckets: int = 1  # rolling: how many fixed sub-windows make the window
    unit: str = "requests"  # or "points" (GraphQL cost)

    def __post_init__(self) -> None:
        if self.capacity <= 0:
            raise ValueError(f"limit {self.name}: capacity must be > 0")
        if self.kind == BUCKET and self.rate <= 0:
            raise ValueError(f"limit {self.name}: a bucket needs a rate > 0")
        if self.kind in (WINDOW, ROLLING) and self.window <= 0:
            raise ValueError(f"limit {self.name}: a window needs a length > 0")
        if self.kind == ROLLING and self.sub_buckets < 1:
            raise ValueError(f"limit {self.name}: sub_buckets must be >= 1")


@dataclass(frozen=True, slots=True)
class ServerView:
    """What a server said about one limit in one response; None where it said nothing.

    The rules read it from a response (``elbasy.rules``); the quota store
    merges it into the account's clocks (``elbasy.quota``).
    """

    limit: str  # the limit's name in its rule
    used: float | None = None
    remaining: float | None = None
    capacity: float | None = None
    rate: float | None = None  # a bucket's restore rate, when the server states it
    reset_after: float | None = None  # seconds until the window resets
