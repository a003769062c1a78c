"""Backends: where a cache keeps its entries.

``resolve`` turns what a user passes as ``backend`` into a store object:

- ``None``, ``"memory://"``, a ``dict``, a cachetools or cachebox cache, any
  mutable mapping: ``MemoryBackend`` (entries are objects of this process);
- a ``diskcache.Cache``/``FanoutCache`` or ``"disk:///path"``: ``DiskBackend``;
- a ``redis.Redis``/``RedisCluster`` or ``"redis://"``, ``"rediss://"``,
  ``"unix://"``: ``RedisBackend``;
- a Django cache (``caches["x"]``, ``django.core.cache.cache``) or a
  Flask-Caching ``Cache`` (or its backend): a ``RedisBackend`` for the same
  server when it sits on Redis, else an adapter over the framework's own
  cache API (``_django``, ``_flask``, ``_framework``);
- a store object already made (to set ``max_value_size`` and friends).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from ._shared import SharedStore
from .memory import DEFAULT_MAXSIZE, MemoryBackend, is_mapping

if TYPE_CHECKING:  # at run time __getattr__ imports them, with their library, on first use
    from .disk import DiskBackend
    from .redis import AsyncRedisBackend, RedisBackend

__all__ = [
    "AsyncRedisBackend",
    "DiskBackend",
    "MemoryBackend",
    "RedisBackend",
    "SharedStore",
    "resolve",
]

_SCHEMES = ("memory://", "disk:///path", "redis://", "rediss://", "unix://")

Store = MemoryBackend | SharedStore


def __getattr__(name: str) -> Any:  # the disk and Redis modules load their library lazily
    if name == "DiskBackend":
        from .disk import DiskBackend

        return DiskBackend
    if name in ("RedisBackend", "AsyncRedisBackend"):
        from . import redis

        return getattr(redis, name)
    raise AttributeError(name)


def _memory_from_url(url: str, maxsize: int | None) -> MemoryBackend:
    query = parse_qs(urlsplit(url).query)
    if "maxsize" in query:
        try:
            maxsize = int(query["maxsize"][-1])
        except ValueError:
            raise ValueError(f"maxsize in {url!r} must be an integer") from None
    return MemoryBackend(maxsize=maxsize or DEFAULT_MAXSIZE)


def _from_url(url: str, maxsize: int | None, asynchronous: bool) -> Store:
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        return _memory_from_url(url, maxsize)
    if scheme == "disk":
        from .disk import DiskBackend

        return DiskBackend.from_url(url)
    if scheme in ("redis", "rediss", "unix"):
        from .redis import AsyncRedisBackend, RedisBackend

        return (AsyncRedisBackend if asynchronous else RedisBackend).from_url(url)
    raise ValueError(f"unsupported backend URL {url!r}: supported are {', '.join(_SCHEMES)}")


def resolve(backend: Any, *, maxsize: int | None = None, asynchronous: bool = False) -> Store:
    """The store object for ``backend`` (None, a URL, a mapping, a client or a store).

    ``asynchronous``: for ``AsyncCoalescingCache`` (Redis URLs give an asyncio client).
    """
    store = _resolve(backend, maxsize, asynchronous)
    if isinstance(store, SharedStore):
        if asynchronous and not store.serves_async:
            raise TypeError(
                f"{store!r} blocks: AsyncCoalescingCache needs a redis.asyncio client "
                f"(or a redis:// URL)"
            )
        if not asynchronous and not store.serves_sync:
            raise TypeError(f"{store!r} is asyncio-only: use it with AsyncCoalescingCache")
    return store


def _resolve(backend: Any, maxsize: int | None, asynchronous: bool) -> Store:
    if backend is None:
        return MemoryBackend(maxsize=maxsize or DEFAULT_MAXSIZE)
    if isinstance(backend, (MemoryBackend, SharedStore)):
        return backend
    if isinstance(backend, str):
        return _from_url(backend, maxsize, asynchronous)
    from .disk import is_disk_cache
    from .redis import is_async_redis_client, is_redis_client

    if is_disk_cache(backend):
        from .disk import DiskBackend

        return DiskBackend(backend)
    if is_redis_client(backend):
        from .redis import RedisBackend

        return RedisBackend(backend)
    if is_async_redis_client(backend):
        from .redis import AsyncRedisBackend

        return AsyncRedisBackend(backend)
    framework = _framework_store(backend, asynchronous)
    if framework is not None:
        return framework
    if is_mapping(backend):
        return MemoryBackend(backend)
    raise TypeError(
        f"cannot use {type(backend).__name__} as a cache backend: pass a mapping "
        f"(dict, a cachetools or cachebox cache), a diskcache Cache, a redis.Redis client, "
        f"a Django or Flask-Caching cache, a backend object, or a URL ({', '.join(_SCHEMES)})"
    )


def _framework_store(backend: Any, asynchronous: bool) -> SharedStore | None:
    """The store for a Django or Flask-Caching cache (Redis underneath, or the
    framework's own API), None for anything else. Neither framework is imported
    here: an object of one means it is loaded already."""
    from ._django import django_store, is_django_cache
    from ._flask import flask_store, is_flask_cache

    if is_django_cache(backend):
        return django_store(backend, asynchronous=asynchronous)
    if is_flask_cache(backend):
        return flask_store(backend, asynchronous=asynchronous)
    return None
