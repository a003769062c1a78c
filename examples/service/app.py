"""A FastAPI service reading products through a slow origin, cached on Redis by stampede.

Run it from the repository root (the service needs a Redis and an origin)::

    python -m examples.service.origin --port 8081 --delay-ms 500 &
    REDIS_URL=redis://127.0.0.1:6380/0 ORIGIN_URL=http://127.0.0.1:8081 \\
        uvicorn examples.service.app:app --port 8000 --workers 4

Every worker process reads through one ``@stampede.cached`` function, declared at
import time and bound at startup to a ``distributed=True`` cache on the shared
Redis, so the whole fleet of workers:

- calls the origin once for a cold key, however many requests arrive at once
  and whichever workers they land on (a lease per key in Redis; the other
  workers wait for its pub/sub wake-up and read the stored value);
- refreshes a hot key in the background before it expires (XFetch), once for
  the fleet, and serves the expired value meanwhile if the refresh runs late
  (``stale_ttl``): no request waits for the origin once a key is warm.

Configuration, from environment variables:

    REDIS_URL           required: where entries, leases and wake-ups live
    ORIGIN_URL          the slow origin's base URL (http://127.0.0.1:8081)
    CACHE_TTL           seconds a product is fresh (60)
    CACHE_STALE_TTL     seconds past CACHE_TTL it may still be served (300)
    CACHE_ERROR_TTL     seconds a 404 is remembered, and the back-off after a
                        failed refresh before the next try (5)
    CACHE_NAMESPACE     key prefix in Redis; services sharing one Redis pick
                        different ones (products)
    CACHE_WAIT_TIMEOUT  most seconds a request waits for someone's load (10)
    ORIGIN_TIMEOUT      seconds an origin request may take (5)
    REDIS_TIMEOUT       seconds a Redis call may take before it counts as failed (1)
    CACHE_NEAR_MAXSIZE  products each worker also keeps in memory, served with no
                        Redis read until a write anywhere drops them (0: off)

Endpoints: ``GET /products/{id}`` (the product and the pid of the worker that
answered), ``GET /healthz``, ``GET /stats`` (this worker's cache counters).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import redis.asyncio
from fastapi import Depends, FastAPI, HTTPException, Path, Request, Response

import stampede

PRODUCT_ID = r"^[A-Za-z0-9_-]{1,64}$"  # what may reach the origin's URL and the cache key


class ProductNotFound(LookupError):
    """The origin has no such product (404). Negative-cached: see ``Catalog``."""


class OriginError(Exception):
    """The origin failed (5xx, refused, timed out). Never cached: see ``Catalog``."""


@dataclass(frozen=True)
class Settings:
    """The service's configuration (``Settings.from_env()`` reads the variables above)."""

    redis_url: str
    origin_url: str = "http://127.0.0.1:8081"
    ttl: float = 60.0
    stale_ttl: float = 300.0
    error_ttl: float = 5.0
    namespace: str = "products"
    wait_timeout: float = 10.0
    origin_timeout: float = 5.0
    redis_timeout: float = 1.0
    near_maxsize: int = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        redis_url = env.get("REDIS_URL", "").strip()
        if not redis_url:
            raise RuntimeError("REDIS_URL is required, e.g. REDIS_URL=redis://127.0.0.1:6379/0")

        def seconds(name: str, default: float) -> float:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = float(raw)
            except ValueError:
                raise RuntimeError(f"{name} must be a number of seconds, got {raw!r}") from None
            if not value >= 0:
                raise RuntimeError(f"{name} must be >= 0, got {raw!r}")
            return value

        def count(name: str, default: int) -> int:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            if not raw.isdigit():
                raise RuntimeError(f"{name} must be a whole number >= 0, got {raw!r}")
            return int(raw)

        return cls(
            redis_url=redis_url,
            origin_url=env.get("ORIGIN_URL", "").strip() or cls.origin_url,
            ttl=seconds("CACHE_TTL", cls.ttl),
            stale_ttl=seconds("CACHE_STALE_TTL", cls.stale_ttl),
            error_ttl=seconds("CACHE_ERROR_TTL", cls.error_ttl),
            namespace=env.get("CACHE_NAMESPACE", "").strip() or cls.namespace,
            wait_timeout=seconds("CACHE_WAIT_TIMEOUT", cls.wait_timeout),
            origin_timeout=seconds("ORIGIN_TIMEOUT", cls.origin_timeout),
            redis_timeout=seconds("REDIS_TIMEOUT", cls.redis_timeout),
            near_maxsize=count("CACHE_NEAR_MAXSIZE", cls.near_maxsize),
        )


class Catalog:
    """Products read through the cache: one origin call per key for all the workers."""

    def __init__(self, settings: Settings, http: httpx.AsyncClient) -> None:
        self.settings = settings
        self._http = http

    async def product(self, product_id: str) -> dict[str, Any]:
        """The product, through the cache (``product`` below, bound at startup)."""
        return await product(self, product_id)

    async def _fetch(self, product_id: str) -> dict[str, Any]:
        try:
            response = await self._http.get(f"/products/{quote(product_id, safe='')}")
        except httpx.HTTPError as exc:
            raise OriginError(f"origin unreachable ({type(exc).__name__})") from exc
        if response.status_code == 404:
            raise ProductNotFound(product_id)
        if response.status_code != 200:
            raise OriginError(f"origin answered {response.status_code}")
        try:
            body = response.json()
        except ValueError as exc:
            raise OriginError("origin answered something that is not JSON") from exc
        if not isinstance(body, dict):
            raise OriginError("origin answered JSON that is not an object")
        return body


# Declared at import time, on a store named "products" that each worker binds at
# startup (``lifespan``: the Redis client is made there). Called before that, it
# raises stampede.StampedeError saying what to bind. The catalog is an argument
# (it holds the origin's client) but not part of the key: one entry per product.
@stampede.cached(
    cache=stampede.deferred("products"), key=lambda catalog, product_id: product_id
)
async def product(catalog: Catalog, product_id: str) -> dict[str, Any]:
    return await catalog._fetch(product_id)


def products_cache(
    settings: Settings, store: redis.asyncio.Redis
) -> stampede.AsyncCoalescingCache[dict[str, Any]]:
    """The cache ``product`` is bound to, with the settings a real service would use.

    - distributed=True: the workers (and other hosts on this Redis) share one
      load per key through a lease, not one load per process.
    - stale_ttl: stale-while-revalidate and stale-if-error. An expired product
      is served while one background refresh runs, and kept being served if
      the origin fails (no new try before error_ttl has passed), for up to
      stale_ttl past its ttl. A product a few minutes old beats a 502.
    - cache_errors=(ProductNotFound,): a 404 is remembered for error_ttl, so
      requests for ids that do not exist (a crawler, an attack) do not all
      reach the origin. It is raised again as ProductNotFound in every worker.
    - OriginError (5xx, timeouts, refused connections) is not listed: it is
      shared only with the requests already waiting for that load, and the
      next request tries again; caching it would turn a blip into error_ttl
      seconds of 502s. A usable stale value always wins over it anyway.
    - wait_timeout: no request hangs longer than this waiting for another
      caller's load (LoadTimeout, answered 504); above origin_timeout, so a
      slow but successful origin call is still waited for.
    - near_maxsize (CACHE_NEAR_MAXSIZE, off by default): each worker keeps hot
      products in memory too, dropped when any worker writes them; a hot
      product then costs no Redis read at all (docs/concepts/near-cache.md).
    - Redis failures fail open (the default): each worker then coalesces
      its own requests and calls the origin, behind a circuit breaker.
    """
    return stampede.AsyncCoalescingCache(
        store,
        ttl=settings.ttl,
        stale_ttl=settings.stale_ttl,
        distributed=True,
        namespace=settings.namespace,
        cache_errors=(ProductNotFound,),
        error_ttl=settings.error_ttl,
        wait_timeout=settings.wait_timeout,
        near_maxsize=settings.near_maxsize,
        name="products",
    )


def open_clients(settings: Settings) -> tuple[redis.asyncio.Redis, httpx.AsyncClient]:
    """A worker's Redis client and origin client (the caller closes both)."""
    # Short socket timeouts (REDIS_TIMEOUT): a Redis that stops answering costs that
    # much per Redis call until three have failed; then the circuit breaker makes the cache skip
    # Redis for a while and load through each worker's own single-flight (fail open).
    store = redis.asyncio.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout,
    )
    http = httpx.AsyncClient(
        base_url=settings.origin_url,
        timeout=settings.origin_timeout,
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
    )
    return store, http


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Per worker: read the settings, open the clients, close them at shutdown."""
    settings = Settings.from_env()
    store, http = open_clients(settings)
    stampede.bind("products", products_cache(settings, store))
    app.state.catalog = Catalog(settings, http)
    app.state.store = store
    try:
        yield
    finally:
        await http.aclose()
        await store.aclose()


app = FastAPI(title="stampede example: products through a slow origin", lifespan=lifespan)


def get_catalog(request: Request) -> Catalog:
    catalog = request.app.state.catalog
    assert isinstance(catalog, Catalog)
    return catalog


CatalogDep = Annotated[Catalog, Depends(get_catalog)]


@app.get("/products/{product_id}")
async def read_product(
    product_id: Annotated[str, Path(pattern=PRODUCT_ID)], catalog: CatalogDep, response: Response
) -> dict[str, Any]:
    """The product, from the cache or (once for every worker) from the origin.

    The ``Server-Timing`` header says how long the cache call took in this
    worker: a hit costs a Redis round trip, a request that waited for the
    origin costs at least the origin's latency.
    """
    started = time.perf_counter()
    try:
        product = await catalog.product(product_id)
    except ProductNotFound:
        raise HTTPException(404, f"no product {product_id!r}") from None
    except OriginError as exc:
        raise HTTPException(502, f"the product origin failed: {exc}") from None
    except stampede.LoadTimeout:
        raise HTTPException(504, "timed out waiting for the product origin") from None
    spent = (time.perf_counter() - started) * 1000
    response.headers["Server-Timing"] = f"cache;dur={spent:.3f}"
    return {"product": product, "pid": os.getpid()}


@app.get("/healthz")
async def healthz(request: Request) -> dict[str, Any]:
    """Alive, with this worker's pid; Redis is reported, not required (the cache fails open)."""
    store: redis.asyncio.Redis = request.app.state.store
    try:
        await asyncio.wait_for(store.ping(), 0.5)
        redis_state = "ok"
    except Exception:
        redis_state = "unavailable"
    return {"status": "ok", "pid": os.getpid(), "redis": redis_state}


@app.get("/stats")
async def stats(catalog: CatalogDep) -> dict[str, Any]:
    """This worker's cache counters (each worker keeps its own)."""
    info = product.cache_info()
    settings = catalog.settings
    return {
        "pid": os.getpid(),
        "cache": {
            "namespace": settings.namespace,
            "ttl": settings.ttl,
            "stale_ttl": settings.stale_ttl,
            "error_ttl": settings.error_ttl,
            "distributed": True,
        },
        "stats": dataclasses.asdict(info.stats),
        "hit_ratio": info.stats.hit_ratio,
    }
