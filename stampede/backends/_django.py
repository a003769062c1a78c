"""Django's caches: ``CoalescingCache(caches["default"])``, or ``django.core.cache.cache``.

A cache on Redis becomes a ``RedisBackend`` on a redis-py client for the same
server, so everything stampede does on Redis works (``distributed=True``,
pub/sub wake-ups, the near cache):

- django-redis: the client ``django_redis.get_redis_connection(alias)`` gives
  (or, for a cache not named in ``CACHES``, ``cache.client.get_client()``, the
  call that function makes);
- Django's own ``RedisCache`` keeps its client private (``_cache``), so a
  client is made from the alias's public settings: the first server of
  ``LOCATION`` (Django writes there) and ``OPTIONS``, as Django makes its pool.

Finding the alias: Django gives each thread its own cache objects, so the
object passed is compared with ``caches[alias]`` of this thread, alias by
alias (``django.core.cache.cache`` compares equal to the default's).

Any other cache (local memory, files, database, Memcached, a third party's)
becomes a ``DjangoCacheStore``: Django's public cache API, with the timing
and clearing rules of ``_framework``. It calls ``caches[alias]`` on every
operation, so each thread uses its own object, as Django intends.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Sequence
from typing import Any

from ._framework import FrameworkStore
from ._shared import SharedStore


def is_django_cache(obj: object) -> bool:
    """Is ``obj`` a Django cache, or ``django.core.cache.cache`` (a proxy for one)?"""
    base = sys.modules.get("django.core.cache.backends.base")
    if base is None:  # Django was never imported: obj cannot be one of its caches
        return False
    if isinstance(obj, base.BaseCache):
        return True
    connection = sys.modules.get("django.utils.connection")
    if connection is None or not isinstance(obj, connection.ConnectionProxy):
        return False
    return isinstance(_behind(obj), base.BaseCache)


def _behind(proxy: Any) -> Any:
    """The object a ``ConnectionProxy`` stands for in this thread: the owner of the
    method it hands out (a database connection proxy has no ``get``: None)."""
    return getattr(getattr(proxy, "get", None), "__self__", None)


def _django(module: str) -> Any:
    """A module of Django (or django-redis), untyped: neither ships type hints."""
    return importlib.import_module(module)


def _alias_of(cache: Any) -> str | None:
    """The alias in ``settings.CACHES`` whose cache in this thread is ``cache``."""
    caches = _django("django.core.cache").caches
    for alias in caches:
        try:
            candidate = caches[alias]
        except Exception:  # an alias that cannot be opened here (a missing library)
            continue
        # ``caches[alias] == cache`` is identity, and for a proxy, its own __eq__.
        if candidate is cache or candidate == cache:
            return str(alias)
    return None


def django_store(backend: Any, *, asynchronous: bool = False) -> SharedStore:
    """The store for a Django cache: Redis when it sits on Redis, else the adapter."""
    alias = _alias_of(backend)
    cache = backend if alias is None else _cache(alias)
    if alias is None and not _is_base_cache(cache):
        cache = _behind(backend)
    kind = _redis_kind(cache)
    if kind is not None and asynchronous:
        raise TypeError(
            f"AsyncCoalescingCache cannot use the Django cache {_named(alias, cache)} "
            f"(Django's Redis client blocks): pass a redis.asyncio client, or a redis:// "
            f"URL, for the same server"
        )
    if kind == "django-redis":
        return _redis_backend(_django_redis_client(alias, cache))
    if kind == "django":
        if alias is None:
            raise TypeError(
                f"{type(cache).__name__} is not one of this thread's django.core.cache."
                f"caches: stampede makes its Redis client from settings.CACHES[alias], so "
                f"pass caches[alias] (or a redis.Redis client for the same server)"
            )
        return _redis_backend(_client_from_settings(alias))
    return DjangoCacheStore(cache, alias=alias)


def _cache(alias: str) -> Any:
    return _django("django.core.cache").caches[alias]


def _is_base_cache(obj: object) -> bool:
    return isinstance(obj, _django("django.core.cache.backends.base").BaseCache)


def _named(alias: str | None, cache: Any) -> str:
    return f"caches[{alias!r}]" if alias is not None else type(cache).__name__


def _redis_kind(cache: Any) -> str | None:
    """``"django-redis"``, ``"django"`` (Django's own RedisCache), or None (no Redis)."""
    django_redis = sys.modules.get("django_redis.cache")
    if django_redis is not None and isinstance(cache, django_redis.RedisCache):
        return "django-redis"
    redis_cache = _django("django.core.cache.backends.redis").RedisCache
    return "django" if isinstance(cache, redis_cache) else None


def _redis_backend(client: Any) -> SharedStore:
    from .redis import RedisBackend

    return RedisBackend(client)


def _django_redis_client(alias: str | None, cache: Any) -> Any:
    try:
        if alias is not None:
            return _django("django_redis").get_redis_connection(alias, write=True)
        return cache.client.get_client(write=True)  # what get_redis_connection calls
    except NotImplementedError as exc:  # a client class without one (sharding)
        raise TypeError(
            f"django-redis gives no single Redis client for {_named(alias, cache)} "
            f"({exc}): pass a redis.Redis client for the server stampede should use"
        ) from exc


# OPTIONS that Django's RedisCache keeps for itself rather than for the pool.
_NOT_FOR_THE_POOL = ("serializer", "parser_class", "pool_class")


def _client_from_settings(alias: str) -> Any:
    """A client for the server Django's ``RedisCache`` of ``alias`` writes to."""
    from .redis import _URL_CLIENT, _redis

    redis = _redis()
    conf = _django("django.conf").settings.CACHES[alias]
    location = conf.get("LOCATION", "")
    servers = re.split("[;,]", location) if isinstance(location, str) else list(location)
    if not servers or not servers[0]:
        raise ValueError(f"settings.CACHES[{alias!r}] names no Redis server in LOCATION")
    options = dict(conf.get("OPTIONS") or {})
    pool_class = options.get("pool_class") or redis.ConnectionPool
    if isinstance(pool_class, str):
        pool_class = _django("django.utils.module_loading").import_string(pool_class)
    pool_options = {k: v for k, v in options.items() if k not in _NOT_FOR_THE_POOL}
    # stampede's defaults for its own clients (timeouts, no retries) unless the
    # settings say otherwise; entries are binary whatever they say.
    kwargs = {**_URL_CLIENT, **pool_options, "decode_responses": False}
    return redis.Redis(connection_pool=pool_class.from_url(servers[0], **kwargs))


class DjangoCacheStore(FrameworkStore):
    """Entries in a Django cache through its public API (``get_many``, ``set``,
    ``add``, ``delete``); see ``stampede.backends._framework`` for the rules."""

    name = "Django cache"

    def __init__(self, cache: Any, *, alias: str | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.alias: str | None = alias
        self.cache: Any = cache  # used when it has no alias; else this thread's caches[alias]

    def _here(self) -> Any:
        return self.cache if self.alias is None else _cache(self.alias)

    def describe(self) -> str:
        return _named(self.alias, self.cache)

    def _fetch(self, keys: Sequence[str]) -> dict[str, Any]:
        return dict(self._here().get_many(keys))

    def _put(self, key: str, value: bytes, timeout: int | None) -> None:
        self._here().set(key, value, timeout)  # Django: None keeps it without expiry

    def _add(self, key: str, value: bytes) -> None:
        self._here().add(key, value, None)

    def _remove(self, key: str) -> None:
        self._here().delete(key)
