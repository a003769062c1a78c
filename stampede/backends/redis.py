"""Redis: wrap a ``redis.Redis`` (or ``RedisCluster``) as it is.

A read is one round trip: a small Lua script returns the value and its
``PTTL`` together (``EVALSHA``; the script is loaded once). A write is one
``SET ... PX``: Redis drops the entry by itself once nobody may serve it
(``ttl + stale_ttl``). The client must return bytes (``decode_responses``
off): entries are binary.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

from ._shared import SharedStore, ttl_ms

# GET and PTTL in one round trip. A Lua table stops at its first nil, so a
# missing key answers nil rather than {nil, -2}.
_READ = """
local v = redis.call('GET', KEYS[1])
if not v then return nil end
return {v, redis.call('PTTL', KEYS[1])}
"""

SCHEMES = ("redis", "rediss", "unix")


def _redis() -> Any:
    try:
        import redis
    except ImportError:  # pragma: no cover - exercised without the extra
        raise ImportError(
            "the Redis backend needs redis-py: pip install 'stampede[redis]'"
        ) from None
    return redis


def is_redis_client(obj: object) -> bool:
    module = type(obj).__module__
    if not module.startswith("redis"):
        return False
    redis = _redis()
    cluster = getattr(getattr(redis, "cluster", None), "RedisCluster", ())
    return isinstance(obj, (redis.Redis, cluster)) if cluster else isinstance(obj, redis.Redis)


def _check_bytes(client: Any) -> None:
    kwargs: dict[str, Any] = {}
    get_kwargs = getattr(client, "get_connection_kwargs", None)
    if callable(get_kwargs):
        kwargs = get_kwargs()
    elif getattr(client, "connection_pool", None) is not None:
        kwargs = client.connection_pool.connection_kwargs
    if kwargs.get("decode_responses"):
        raise ValueError(
            "stampede stores binary entries: give it a Redis client made with "
            "decode_responses=False (a second client on the same pool settings is fine)"
        )


class RedisBackend(SharedStore):
    """Entries in Redis, through a sync ``redis.Redis`` / ``RedisCluster`` client."""

    name = "Redis"
    serves_async = False

    def __init__(self, client: Any, **options: Any) -> None:
        super().__init__(**options)
        redis = _redis()
        _check_bytes(client)
        self.client = client
        self.errors = (redis.RedisError, OSError)
        self._read = client.register_script(_READ)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisBackend:
        redis = _redis()
        client = redis.Redis.from_url(
            url, socket_timeout=1.0, socket_connect_timeout=1.0, decode_responses=False
        )
        return cls(client, **options)

    def _get_raw(self, key: str) -> tuple[bytes | None, float | None]:
        found = self._read(keys=[key])
        if found is None:
            return None, None
        data, pttl = found
        return data, (pttl / 1000.0 if pttl >= 0 else None)

    def _set_raw(self, key: str, data: bytes, ttl: float) -> None:
        self.client.set(key, data, px=ttl_ms(ttl))

    def _delete_raw(self, key: str) -> None:
        self.client.delete(key)

    def _clear_raw(self, prefix: str) -> None:
        batch: list[bytes] = []
        for key in self.client.scan_iter(match=_pattern(prefix), count=500):
            batch.append(key)
            if len(batch) >= 500:
                self.client.unlink(*batch)
                batch.clear()
        if batch:
            self.client.unlink(*batch)

    def __repr__(self) -> str:
        return f"RedisBackend({self.client!r})"


class AsyncRedisBackend(SharedStore):
    """Entries in Redis, through a ``redis.asyncio.Redis`` / ``RedisCluster`` client."""

    name = "Redis"
    serves_sync = False

    def __init__(self, client: Any, **options: Any) -> None:
        super().__init__(**options)
        redis = _redis()
        _check_bytes(client)
        self.client = client
        self.errors = (redis.RedisError, OSError, asyncio.TimeoutError)
        self._read = client.register_script(_READ)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> AsyncRedisBackend:
        redis = _redis()
        client = redis.asyncio.Redis.from_url(
            url, socket_timeout=1.0, socket_connect_timeout=1.0, decode_responses=False
        )
        return cls(client, **options)

    async def _aget_raw(self, key: str) -> tuple[bytes | None, float | None]:
        found = await self._read(keys=[key])
        if found is None:
            return None, None
        data, pttl = found
        return data, (pttl / 1000.0 if pttl >= 0 else None)

    async def _aset_raw(self, key: str, data: bytes, ttl: float) -> None:
        await self.client.set(key, data, px=ttl_ms(ttl))

    async def _adelete_raw(self, key: str) -> None:
        await self.client.delete(key)

    async def _aclear_raw(self, prefix: str) -> None:
        batch: list[bytes] = []
        async for key in self.client.scan_iter(match=_pattern(prefix), count=500):
            batch.append(key)
            if len(batch) >= 500:
                await self.client.unlink(*batch)
                batch.clear()
        if batch:
            await self.client.unlink(*batch)

    def _get_raw(self, key: str) -> tuple[bytes | None, float | None]:
        raise TypeError("an asyncio Redis client serves AsyncCoalescingCache only")

    _set_raw = _delete_raw = _clear_raw = _get_raw  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"AsyncRedisBackend({self.client!r})"


def is_async_redis_client(obj: object) -> bool:
    if not type(obj).__module__.startswith("redis"):
        return False
    redis = _redis()
    cluster = getattr(getattr(redis.asyncio, "cluster", None), "RedisCluster", None)
    kinds = (redis.asyncio.Redis, cluster) if cluster else (redis.asyncio.Redis,)
    return isinstance(obj, kinds)


def _pattern(rest_prefix: str) -> str:
    """A SCAN pattern for the keys whose rest (after the hash tag) starts so."""
    return "stampede:{*}:" + _glob_escape(rest_prefix) + "*"


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def is_redis_url(url: str) -> bool:
    return urlsplit(url).scheme in SCHEMES
