"""The example service's app written with stampede's peers, for ``benchmarks/bench_fastapi.py``.

Each module builds a FastAPI app with the same endpoints, origin client and
settings (``CACHE_TTL``, ``CACHE_STALE_TTL``, ``CACHE_NAMESPACE``, ``REDIS_URL``,
``ORIGIN_URL``) as ``examples/service/app.py``; only the cached function differs:

- ``cashews_app``: ``plain`` (``@cache(ttl)``), ``early`` (``@cache.early``), ``lock``
  (``@cache(ttl, lock=True)``);
- ``aiocache_app``: ``cached`` (``@cached`` on ``RedisCache``), ``stampede``
  (``@cached_stampede``);
- ``floor_app``: no cache library, a raw redis-py ``GET`` (and ``SET`` on a miss).

Run like the example (from the repository root, ``benchmarks`` on ``PYTHONPATH``)::

    uvicorn fastapi_apps.cashews_app:plain --workers 4
"""
