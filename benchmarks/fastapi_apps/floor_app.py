"""The example service over a raw redis-py ``GET`` (pickle), no cache library: the floor.

A hit is one ``GET`` and ``pickle.loads``: the least any Redis-backed cache can cost
per request in this app. A miss calls the origin and ``SET``s the value with
``EX=CACHE_TTL``; no stampede protection at all.
"""

from __future__ import annotations

import pickle
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio

from examples.service.app import Settings

from ._peer import Fetch, Product, make_app


async def _build(settings: Settings, fetch: Fetch) -> tuple[Product, Callable[[], Awaitable[None]]]:
    client: redis.asyncio.Redis = redis.asyncio.Redis.from_url(settings.redis_url)
    ttl_ms = max(1, round(settings.ttl * 1000))

    async def product(product_id: str) -> dict[str, Any]:
        key = f"{settings.namespace}:{product_id}"
        raw = await client.get(key)
        if isinstance(raw, bytes):
            value: dict[str, Any] = pickle.loads(raw)
            return value
        value = await fetch(product_id)
        await client.set(key, pickle.dumps(value), px=ttl_ms)
        return value

    return product, client.aclose


app = make_app("raw redis-py GET", _build)
