"""One FastAPI app around any cached ``product(product_id)``: the example's own endpoints.

The request handlers are ``examples/service/app.py``'s functions, registered
unchanged (``read_product``, ``healthz``), so every app of the benchmark parses,
validates, times (``Server-Timing``) and answers a request the same way; only
the cached function behind ``Catalog.product`` differs.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
from fastapi import FastAPI

from examples.service.app import Catalog, Settings, healthz, open_clients, read_product

Fetch = Callable[[str], Awaitable[dict[str, Any]]]
Product = Callable[[str], Awaitable[dict[str, Any]]]
# (settings, the origin fetch) -> (the cached function, what to await at shutdown)
Build = Callable[[Settings, Fetch], Awaitable[tuple[Product, Callable[[], Awaitable[None]]]]]


class PeerCatalog(Catalog):
    """``Catalog`` with another library's cached function in place of stampede's."""

    def __init__(self, settings: Settings, http: httpx.AsyncClient) -> None:
        # Catalog.__init__ is skipped on purpose: it builds stampede's function.
        # ``product`` is set by ``make_app`` once the peer's function is built.
        self.settings = settings
        self._http = http


def make_app(title: str, build: Build) -> FastAPI:
    """The example's endpoints (``/products/{id}``, ``/healthz``) over ``build``'s function."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings = Settings.from_env()
        store, http = open_clients(settings)  # the example's own (Redis: only /healthz)
        catalog = PeerCatalog(settings, http)
        product, close = await build(settings, catalog._fetch)  # the example's origin call
        catalog.product = product  # type: ignore[assignment]  # another library's wrapper
        app.state.catalog = catalog
        app.state.store = store
        try:
            yield
        finally:
            await close()
            await http.aclose()
            await store.aclose()

    app = FastAPI(title=title, lifespan=lifespan)
    app.get("/products/{product_id}")(read_product)
    app.get("/healthz")(healthz)
    return app
