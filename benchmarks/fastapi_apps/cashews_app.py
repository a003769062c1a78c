"""The example service with cashews on Redis: ``plain``, ``early`` and ``lock`` apps.

- ``plain``: ``@cache(ttl=CACHE_TTL)``, cashews' default ``protected=True`` (concurrent
  identical calls in one process share one read and one load); the DESIGN row's reference.
- ``early``: ``@cache.early(ttl=CACHE_TTL + CACHE_STALE_TTL, early_ttl=CACHE_TTL)``: the value
  is recomputed in the background once ``CACHE_TTL`` has passed and served meanwhile, as
  stampede's ``ttl`` + ``stale_ttl`` (behind a ``SET NX`` lock in Redis).
- ``lock``: ``@cache(ttl=CACHE_TTL, lock=True)``: a lock in Redis, one load for all workers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from cashews import Cache

from examples.service.app import Settings

from ._peer import Fetch, Product, make_app


def _build(mode: str) -> Callable[..., Awaitable[tuple[Product, Callable[[], Awaitable[None]]]]]:
    async def build(
        settings: Settings, fetch: Fetch
    ) -> tuple[Product, Callable[[], Awaitable[None]]]:
        cache = Cache()  # one per worker, on the shared Redis; no client-side cache
        cache.setup(settings.redis_url)
        key = f"{settings.namespace}:{{product_id}}"
        if mode == "plain":
            decorator = cache(ttl=settings.ttl, key=key)
        elif mode == "early":
            decorator = cache.early(
                ttl=settings.ttl + settings.stale_ttl, early_ttl=settings.ttl, key=key
            )
        elif mode == "lock":
            decorator = cache(ttl=settings.ttl, key=key, lock=True)
        else:
            raise ValueError(mode)

        async def product(product_id: str) -> dict[str, Any]:
            return await fetch(product_id)

        return decorator(product), cache.close

    return build


plain = make_app("cashews @cache", _build("plain"))
early = make_app("cashews @cache.early", _build("early"))
lock = make_app("cashews @cache(lock=True)", _build("lock"))
