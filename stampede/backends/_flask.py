"""Flask-Caching: ``CoalescingCache(cache)`` for a ``flask_caching.Cache`` (or its backend).

A Redis backend (``RedisCache``, ``RedisSentinelCache``, ``RedisClusterCache``)
becomes a ``RedisBackend``, so everything stampede does on Redis works
(``distributed=True``, pub/sub wake-ups, the near cache). Flask-Caching keeps
its client private (cachelib's ``_write_client``), so stampede makes a client
of its own from the settings the backend was made from, read the way
Flask-Caching's factories read them: ``app.config`` overlaid with the
``Cache(config=...)`` mapping (``CACHE_REDIS_URL``, ``CACHE_REDIS_HOST``,
``_PORT``, ``_DB``, ``_PASSWORD``, ``CACHE_OPTIONS``, the Sentinel and Cluster
settings). Settings passed only to ``init_app(app, config=...)`` are not kept
by Flask-Caching: when those settings do not name the backend's class in
``CACHE_TYPE``, stampede refuses rather than guess another server.

Any other backend (SimpleCache, FileSystemCache, Memcached, a plain cachelib
cache) becomes a ``CachelibStore``: cachelib's public API, with the timing and
clearing rules of ``_framework``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import Any

from ._framework import FrameworkStore
from ._shared import SharedStore


def is_flask_cache(obj: object) -> bool:
    """Is ``obj`` a ``flask_caching.Cache`` or a cachelib cache (Flask-Caching's backends)?"""
    flask_caching = sys.modules.get("flask_caching")
    if flask_caching is not None and isinstance(obj, flask_caching.Cache):
        return True
    base = sys.modules.get("cachelib.base")  # never imported: obj cannot be one
    return base is not None and isinstance(obj, base.BaseCache)


def flask_store(obj: Any, *, asynchronous: bool = False) -> SharedStore:
    """The store for a Flask-Caching cache: Redis when it sits on Redis, else the adapter."""
    flask_caching = sys.modules.get("flask_caching")  # absent: a plain cachelib cache
    if flask_caching is not None and isinstance(obj, flask_caching.Cache):
        owner: Any = obj
        backend = _backend_of(obj)
    else:
        owner, backend = _owner_of(obj), obj
    if not _on_redis(backend):
        return CachelibStore(backend)
    if asynchronous:
        raise TypeError(
            f"AsyncCoalescingCache cannot use Flask-Caching's {type(backend).__name__} "
            f"(its Redis client blocks): pass a redis.asyncio client, or a redis:// URL, "
            f"for the same server"
        )
    if owner is None:
        raise TypeError(
            f"{type(backend).__name__} keeps its Redis client private, so stampede makes "
            f"one from the settings of the flask_caching.Cache it belongs to, found through "
            f"that Cache or inside its application context: pass the Cache, or a "
            f"redis.Redis client for the same server"
        )
    from .redis import RedisBackend

    return RedisBackend(_client_from_config(backend, _config(owner, backend)))


def _backend_of(cache: Any) -> Any:
    try:
        return cache.cache  # the app's backend: current_app's, else the app of init_app
    except (AttributeError, KeyError, RuntimeError) as exc:
        raise TypeError(
            "this flask_caching.Cache has no backend yet: call cache.init_app(app) before "
            "making a stampede cache on it (or declare the stampede cache at import time "
            "and bind it at startup)"
        ) from exc


def _app(owner: Any) -> Any:
    import flask

    if flask.has_app_context() and owner in flask.current_app.extensions.get("cache", {}):
        return flask.current_app
    return owner.app


def _owner_of(backend: Any) -> Any:
    """The ``flask_caching.Cache`` whose backend is ``backend`` in the current app."""
    flask = sys.modules.get("flask")
    if flask is None or not flask.has_app_context():
        return None
    for owner, candidate in flask.current_app.extensions.get("cache", {}).items():
        if candidate is backend:
            return owner
    return None


def _on_redis(backend: Any) -> bool:
    from cachelib.redis import RedisCache

    return isinstance(backend, RedisCache)


def _config(owner: Any, backend: Any) -> dict[str, Any]:
    """The settings ``backend`` was made from: the app's, overlaid with the Cache's own."""
    from werkzeug.utils import import_string

    config = dict(_app(owner).config)
    config.update(owner.config or {})
    named = str(config.get("CACHE_TYPE") or "NullCache")
    try:
        made_by = import_string(named if "." in named else f"flask_caching.backends.{named}")
    except ImportError:
        made_by = None
    if made_by is not type(backend):
        raise TypeError(
            f"the Flask-Caching settings stampede can read (app.config and Cache(config=...)) "
            f"name CACHE_TYPE {named!r}, not this cache's {type(backend).__name__}: settings "
            f"given to init_app(app, config=...) alone are not kept; put them in app.config, "
            f"or pass a redis.Redis client for the same server"
        )
    return config


# cachelib's own parameters, which Flask-Caching's CACHE_OPTIONS may carry next to
# the Redis client's: not for the client.
_CACHELIB_OPTIONS = frozenset(
    (
        "default_timeout",
        "key_prefix",
        "ignore_delete_many_errors",
        "check_connection",
        "host",
        "port",
        "password",
        "db",
        "cluster",
        "sentinels",
        "master",
        "redis_url",
        "skip_full_coverage_check",
    )
)


def _client_from_config(backend: Any, config: dict[str, Any]) -> Any:
    """A redis-py client for the server ``backend`` uses, made as Flask-Caching's
    factory for its class makes its own, with stampede's defaults underneath."""
    from flask_caching.backends.rediscache import RedisClusterCache, RedisSentinelCache

    from .redis import _URL_CLIENT, _redis

    redis = _redis()
    options = {
        k: v for k, v in (config.get("CACHE_OPTIONS") or {}).items() if k not in _CACHELIB_OPTIONS
    }
    # Timeouts and no retries unless the settings say otherwise; binary entries always.
    own = {**_URL_CLIENT, **options, "decode_responses": False}
    password = config.get("CACHE_REDIS_PASSWORD") or None
    if isinstance(backend, RedisClusterCache):
        own.pop("retry", None)  # a cluster client retries by its own settings
        url = config.get("CACHE_REDIS_URL")
        if url:
            return redis.RedisCluster.from_url(url, **own)
        nodes = [
            redis.cluster.ClusterNode(host.strip(), int(port))
            for host, port in (node.split(":") for node in config["CACHE_REDIS_CLUSTER"].split(","))
        ]
        return redis.RedisCluster(startup_nodes=nodes, password=password, **own)
    if isinstance(backend, RedisSentinelCache):
        own.pop("retry", None)
        sentinel_password = config.get("CACHE_REDIS_SENTINEL_PASSWORD")
        sentinel = importlib.import_module("redis.sentinel").Sentinel(
            config.get("CACHE_REDIS_SENTINELS", [("127.0.0.1", 26379)]),
            sentinel_kwargs={"password": sentinel_password} if sentinel_password else None,
            password=password,
            db=config.get("CACHE_REDIS_DB", 0),
            **own,
        )
        return sentinel.master_for(config.get("CACHE_REDIS_SENTINEL_MASTER", "mymaster"))
    host = config.get("CACHE_REDIS_HOST", "localhost")
    if not isinstance(host, str):
        return host  # the app gave Flask-Caching a client as its "host": the same client
    url = config.get("CACHE_REDIS_URL")
    if url:  # as Flask-Caching: the URL's own db, if it names one, wins over CACHE_REDIS_DB
        return redis.Redis.from_url(url, db=config.get("CACHE_REDIS_DB", 0), **own)
    return redis.Redis(
        host=host,
        port=config.get("CACHE_REDIS_PORT", 6379),
        db=config.get("CACHE_REDIS_DB", 0),
        password=password,
        **own,
    )


class CachelibStore(FrameworkStore):
    """Entries in a Flask-Caching (cachelib) cache through its public API
    (``get_many``, ``set``, ``add``, ``delete``); see ``stampede.backends._framework``."""

    name = "Flask-Caching cache"

    def __init__(self, cache: Any, **options: Any) -> None:
        super().__init__(**options)
        self.cache: Any = cache

    def describe(self) -> str:
        return type(self.cache).__name__

    def _fetch(self, keys: Sequence[str]) -> dict[str, Any]:
        return dict(zip(keys, self.cache.get_many(*keys), strict=True))

    def _put(self, key: str, value: bytes, timeout: int | None) -> None:
        self.cache.set(key, value, timeout=0 if timeout is None else timeout)  # 0: no expiry

    def _add(self, key: str, value: bytes) -> None:
        self.cache.add(key, value, timeout=0)

    def _remove(self, key: str) -> None:
        self.cache.delete(key)
