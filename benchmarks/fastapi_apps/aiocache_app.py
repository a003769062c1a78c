"""The example service with aiocache on Redis: ``cached`` and ``stampede`` apps.

- ``cached``: ``@cached(ttl=CACHE_TTL, cache=RedisCache, serializer=PickleSerializer())``,
  no stampede protection (each request that misses calls the origin);
- ``stampede``: ``@cached_stampede(lease=2, ...)`` with the same options: a ``SET NX``
  lease in Redis, the others poll for the value.

Pickle, as in ANCHORS.md and ``benchmarks/_fleet.py`` (aiocache's Redis default is JSON).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from aiocache import RedisCache, cached, cached_stampede
from aiocache.serializers import PickleSerializer

from examples.service.app import Settings

from ._peer import Fetch, Product, make_app


def _build(mode: str) -> Callable[..., Awaitable[tuple[Product, Callable[[], Awaitable[None]]]]]:
    async def build(
        settings: Settings, fetch: Fetch
    ) -> tuple[Product, Callable[[], Awaitable[None]]]:
        where = urlsplit(settings.redis_url)
        options: dict[str, Any] = {
            "ttl": settings.ttl,
            "cache": RedisCache,
            "endpoint": where.hostname,
            "port": where.port,
            "serializer": PickleSerializer(),
            "namespace": settings.namespace,
            "key_builder": lambda fn, product_id: product_id,
        }
        if mode == "cached":
            decorator = cached(**options)
        elif mode == "stampede":
            decorator = cached_stampede(lease=2, **options)
        else:
            raise ValueError(mode)

        async def product(product_id: str) -> dict[str, Any]:
            return await fetch(product_id)

        wrapped = decorator(product)

        async def close() -> None:
            await wrapped.cache.close()

        return wrapped, close

    return build


cached_app = make_app("aiocache @cached", _build("cached"))
stampede_app = make_app("aiocache @cached_stampede", _build("stampede"))
