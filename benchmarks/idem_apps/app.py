"""``POST /orders`` behind the idempotency library named by ``IDEM_LIBRARY``.

Every app has the same route and the same handler: it counts its run with
``INCR runs:<namespace>:<key>`` on the counter Redis, sleeps ``IDEM_WORK_MS``
(50 ms) and answers 201 with the order, the run's number, the worker's pid and a
random nonce, so a client can tell a replay (the first run's body) from a second
run (another body). Its keys are in alphabetical order, so a library that stores
the value as sorted JSON (Powertools) replays the same bytes.

- ``bare``: no idempotency at all;
- ``stampede`` / ``stampede-local``: ``stampede.asgi.IdempotencyMiddleware`` over
  ``AsyncIdempotency(redis.asyncio.Redis)``, defaults (wait and replay); ``-local``
  with ``local_records=1000``;
- ``stampede-pg``: the same middleware over ``AsyncIdempotency(IDEM_PG_URL)``, a
  ``postgresql://`` URL (the store's own pool, its defaults); the run counter
  stays on Redis like the others';
- ``idemkit`` / ``idemkit-local``: ``idemkit.IdempotencyMiddleware`` (its ASGI
  adapter) over ``RedisBackend.from_url``, single-tenant on purpose
  (``scope_mode="single_tenant"``), defaults otherwise; ``-local`` with
  ``use_local_cache=True``;
- ``powertools`` / ``powertools-local``: AWS Lambda Powertools has no HTTP
  middleware, so the route (a sync one: Powertools is sync only, FastAPI runs it
  in its thread pool) calls an ``@idempotent_function`` keyed on the
  ``Idempotency-Key`` header (``event_key_jmespath="key"``) on a
  ``RedisCachePersistenceLayer``; an in-progress duplicate's
  ``IdempotencyAlreadyInProgressError`` becomes a 409. The body is not
  validated: ``payload_validation_jmespath`` makes identical retries fail on
  this layer (research/idempotency.md, P3b). ``-local``: ``use_local_cache=True``;
- ``fastapi-idempotency``: its ``IdempotencyMiddleware`` with its ``MemoryStore``:
  the package ships no Redis store (only memory and Tortoise ORM), so the
  records live in each worker process.

Every Redis pool is sized past any burst (redis-py 8 refuses a 101st connection
by default). Settings: ``REDIS_URL`` (the records), ``COUNTER_URL`` (the run counters;
default ``REDIS_URL``), ``IDEM_NAMESPACE``, ``IDEM_WORK_MS``, ``IDEM_COUNT``
(``0``: no ``INCR``, the run number is 0), ``IDEM_PG_URL`` (``stampede-pg``'s records).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
import warnings
from typing import Any

import redis
import redis.asyncio
from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

LIBRARIES = (
    "bare",
    "stampede",
    "stampede-local",
    "stampede-pg",
    "idemkit",
    "idemkit-local",
    "powertools",
    "powertools-local",
    "fastapi-idempotency",
)

LIBRARY = os.environ.get("IDEM_LIBRARY", "bare")
STORE_URL = os.environ["REDIS_URL"]
COUNTER_URL = os.environ.get("COUNTER_URL", STORE_URL)
NS = os.environ.get("IDEM_NAMESPACE", "idem-bench")
WORK = float(os.environ.get("IDEM_WORK_MS", "50")) / 1000
COUNT = os.environ.get("IDEM_COUNT", "1") != "0"
PID = os.getpid()
# redis-py 8's pools refuse a 101st connection: sized past any burst a worker gets.
POOL = 1024


class Order(BaseModel):
    order: int
    amount: int


def _answer(order: Order, run: int) -> dict[str, Any]:
    return {
        "amount": order.amount,
        "nonce": secrets.token_hex(8),
        "order": order.order,
        "pid": PID,
        "run": run,
    }


def _base() -> FastAPI:
    app = FastAPI(title=f"orders ({LIBRARY})")

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"pid": PID, "library": LIBRARY}

    return app


def _async_route(app: FastAPI) -> None:
    counter = redis.asyncio.Redis.from_url(COUNTER_URL, max_connections=POOL)

    @app.post("/orders", status_code=201)
    async def create_order(
        order: Order, idempotency_key: str = Header(default="")
    ) -> dict[str, Any]:
        run = int(await counter.incr(f"runs:{NS}:{idempotency_key}")) if COUNT else 0
        if WORK:
            await asyncio.sleep(WORK)
        return _answer(order, run)


def _stampede(local: bool) -> FastAPI:
    import stampede
    import stampede.asgi

    app = _base()
    app.add_middleware(
        stampede.asgi.IdempotencyMiddleware,
        idempotency=stampede.AsyncIdempotency(
            redis.asyncio.Redis.from_url(STORE_URL, max_connections=POOL),
            namespace=NS,
            local_records=1000 if local else 0,
        ),
    )
    _async_route(app)
    return app


def _stampede_pg() -> FastAPI:
    import stampede
    import stampede.asgi

    app = _base()
    app.add_middleware(
        stampede.asgi.IdempotencyMiddleware,
        idempotency=stampede.AsyncIdempotency(os.environ["IDEM_PG_URL"], namespace=NS),
    )
    _async_route(app)
    return app


def _idemkit(local: bool) -> FastAPI:
    # From their modules: ``idemkit`` itself exports ``RedisBackend`` through ``__getattr__``.
    from idemkit.adapters.asgi import IdempotencyMiddleware
    from idemkit.backends.redis import RedisBackend
    from idemkit.core.policy import HttpConfig

    app = _base()
    app.add_middleware(
        IdempotencyMiddleware,
        backend=RedisBackend.from_url(STORE_URL, namespace=NS, max_connections=POOL),
        config=HttpConfig(scope_mode="single_tenant", use_local_cache=local),
    )
    _async_route(app)
    return app


def _powertools(local: bool) -> FastAPI:
    with warnings.catch_warnings():  # the Redis layer's class is marked deprecated for v4
        warnings.simplefilter("ignore", DeprecationWarning)
        from aws_lambda_powertools.utilities.idempotency import (
            IdempotencyConfig,
            idempotent_function,
        )
        from aws_lambda_powertools.utilities.idempotency.exceptions import (
            IdempotencyAlreadyInProgressError,
            IdempotencyPersistenceLayerError,
            IdempotencyValidationError,
        )
        from aws_lambda_powertools.utilities.idempotency.persistence.redis import (
            RedisCachePersistenceLayer,
        )

        # redis.Redis is the client it is written for (its Protocol is narrower).
        client: Any = redis.Redis.from_url(STORE_URL, max_connections=POOL)
        layer = RedisCachePersistenceLayer(client=client)
    # No Lambda context outside Lambda: Powertools warns on every call that it
    # cannot set an in-progress expiry (the record then holds until it expires).
    warnings.filterwarnings("ignore", message="Couldn't determine the remaining time left")
    counter = redis.Redis.from_url(COUNTER_URL, max_connections=POOL)

    @idempotent_function(  # type: ignore[untyped-decorator]
        data_keyword_argument="request",
        persistence_store=layer,
        config=IdempotencyConfig(event_key_jmespath="key", use_local_cache=local),
        key_prefix=NS,
    )
    def process(request: dict[str, Any]) -> dict[str, Any]:
        run = int(counter.incr(f"runs:{NS}:{request['key']}")) if COUNT else 0
        if WORK:
            time.sleep(WORK)
        return _answer(Order(**request["order"]), run)

    app = _base()

    @app.post("/orders", status_code=201)
    def create_order(order: Order, idempotency_key: str = Header()) -> dict[str, Any]:
        result: dict[str, Any] = process(
            request={"key": idempotency_key, "order": order.model_dump()}
        )
        return result

    def status(code: int) -> Any:
        async def handler(request: Request, exc: Exception) -> JSONResponse:
            return JSONResponse({"detail": type(exc).__name__}, status_code=code)

        return handler

    app.add_exception_handler(IdempotencyAlreadyInProgressError, status(409))
    app.add_exception_handler(IdempotencyValidationError, status(422))
    app.add_exception_handler(IdempotencyPersistenceLayerError, status(503))
    return app


def _fastapi_idempotency() -> FastAPI:
    from fastapi_idempotency import IdempotencyMiddleware, MemoryStore

    app = _base()
    app.add_middleware(IdempotencyMiddleware, store=MemoryStore())
    _async_route(app)
    return app


def build(library: str) -> FastAPI:
    """The app for ``library`` (one of ``LIBRARIES``)."""
    if library == "bare":
        app = _base()
        _async_route(app)
        return app
    if library in ("stampede", "stampede-local"):
        return _stampede(library.endswith("-local"))
    if library == "stampede-pg":
        return _stampede_pg()
    if library in ("idemkit", "idemkit-local"):
        return _idemkit(library.endswith("-local"))
    if library in ("powertools", "powertools-local"):
        return _powertools(library.endswith("-local"))
    if library == "fastapi-idempotency":
        return _fastapi_idempotency()
    raise ValueError(f"IDEM_LIBRARY={library!r}: pick one of {', '.join(LIBRARIES)}")


app = build(LIBRARY)
