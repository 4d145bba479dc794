"""Mock third-party APIs for elbasy's throttling tests and bench (docs/api-limits.md part 4).

They stand for the real Shopify Admin (REST + GraphQL), Etsy Open API v3 and GitHub GraphQL
rate limiters, with configurable plans and scaled-up rates so tests finish fast::

    from mockapis import ManualClock, start_shopify, start_etsy, tls_context_for

    shop = start_shopify(clock=ManualClock(1000.0))
    shop.configure(plan="standard", scale=10)           # C=40, R=20 for every shop
    shop.configure(shop="acme", token="t1", outside_traffic_rps=4)
    ...  # requests to shop.url with Host: acme.myshopify.com, X-Shopify-Access-Token: t1
    shop.stats()["totals"]["throttled"]                 # 429s + THROTTLED bodies
    shop.key_stats("acme", "t1")["rest"]["peak_used"]
    shop.advance(10.0)                                  # only with a ManualClock
    shop.close()

    gh = start_github(clock=ManualClock(1000.0), limit=5000)
    ...  # POST gh.url + "/graphql" with Authorization: bearer <token>
    gh.key_stats("<token>")["remaining"]

The same control is available over HTTP on the mock itself: ``POST /__mock/config``,
``POST /__mock/clock/advance``, ``GET /__mock/state``, ``POST /__mock/reset``.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from .etsy import EtsyAPI
from .github_graphql import GitHubAPI
from .server import Clock, ManualClock, MockServer, install_sni_recorder, wall_clock
from .shopify_graphql import query_cost
from .shopify_rest import ShopifyAPI

__all__ = [
    "EtsyMock",
    "GitHubMock",
    "ManualClock",
    "MockServer",
    "ShopifyMock",
    "query_cost",
    "start_etsy",
    "start_github",
    "start_shopify",
    "tls_context_for",
]


class ShopifyMock(MockServer):
    """Shopify Admin REST and GraphQL on one server (state per (shop, access token))."""

    app: ShopifyAPI

    def __init__(self, tls_ctx: ssl.SSLContext | None = None, clock: Clock | None = None) -> None:
        super().__init__(ShopifyAPI(clock or wall_clock), clock or wall_clock, tls_ctx)

    def configure(  # type: ignore[override]
        self, shop: str | None = None, token: str | None = None, **settings: Any
    ) -> None:
        self.app.configure(shop=shop, token=token, **settings)

    def key_stats(self, shop: str, token: str) -> dict[str, Any]:
        return self.app.key_stats(shop, token)


class EtsyMock(MockServer):
    """Etsy Open API v3 (state per API key)."""

    app: EtsyAPI

    def __init__(self, tls_ctx: ssl.SSLContext | None = None, clock: Clock | None = None) -> None:
        super().__init__(EtsyAPI(clock or wall_clock), clock or wall_clock, tls_ctx)

    def configure(self, key: str | None = None, **settings: Any) -> None:  # type: ignore[override]
        self.app.configure(key=key, **settings)

    def key_stats(self, key: str) -> dict[str, Any]:
        return self.app.key_stats(key)


class GitHubMock(MockServer):
    """GitHub GraphQL (state per token)."""

    app: GitHubAPI

    def __init__(self, tls_ctx: ssl.SSLContext | None = None, clock: Clock | None = None) -> None:
        super().__init__(GitHubAPI(clock or wall_clock), clock or wall_clock, tls_ctx)

    def configure(self, token: str | None = None, **settings: Any) -> None:  # type: ignore[override]
        self.app.configure(token=token, **settings)

    def key_stats(self, token: str) -> dict[str, Any]:
        return self.app.key_stats(token)


def start_shopify(
    tls_ctx: ssl.SSLContext | None = None, clock: Clock | None = None, **settings: Any
) -> ShopifyMock:
    """A running Shopify mock on 127.0.0.1:<port>; ``settings`` become the defaults."""
    mock = ShopifyMock(tls_ctx, clock)
    if settings:
        mock.configure(**settings)
    return mock


def start_etsy(
    tls_ctx: ssl.SSLContext | None = None, clock: Clock | None = None, **settings: Any
) -> EtsyMock:
    """A running Etsy mock on 127.0.0.1:<port>; ``settings`` become the defaults."""
    mock = EtsyMock(tls_ctx, clock)
    if settings:
        mock.configure(**settings)
    return mock


def start_github(
    tls_ctx: ssl.SSLContext | None = None, clock: Clock | None = None, **settings: Any
) -> GitHubMock:
    """A running GitHub GraphQL mock on 127.0.0.1:<port>; ``settings`` become the defaults."""
    mock = GitHubMock(tls_ctx, clock)
    if settings:
        mock.configure(**settings)
    return mock


def tls_context_for(
    ca: Any,
    directory: Path,
    names: tuple[str, ...] = ("*.myshopify.com", "openapi.etsy.com", "api.github.com"),
    ips: tuple[str, ...] = ("127.0.0.1",),
) -> ssl.SSLContext:
    """A server context with a leaf for ``names`` signed by the test CA (``origins.make_ca``)."""
    import origins

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = origins.make_leaf(ca, directory, names=names, ips=ips)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    install_sni_recorder(ctx)
    return ctx
