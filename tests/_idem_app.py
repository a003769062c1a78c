"""A FastAPI app behind ``stampede.asgi.IdempotencyMiddleware``, for tests/test_asgi_idempotency.py.

Run by uvicorn with several workers (``python -m uvicorn tests._idem_app:app
--workers N``). Settings from the environment: ``REDIS_URL`` (records, and the
run counters the test reads), ``IDEM_STORE_URL`` (records elsewhere: a
``postgresql://`` URL), ``IDEM_NAMESPACE``, ``IDEM_LEASE_TTL``,
``IDEM_ON_CONFLICT``, ``IDEM_WAIT_TIMEOUT``. A handler counts each of its runs
with ``INCR runs:<namespace>:<route>:<key>``; ``/payments`` waits until
``release:<namespace>`` exists, so a test can line its duplicates up.
"""

from __future__ import annotations

import asyncio
import gzip
import os
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

import stampede
import stampede.asgi
import stampede.idempotency

URL = os.environ["REDIS_URL"]
NS = os.environ.get("IDEM_NAMESPACE", "idem-test")

counter = redis.asyncio.Redis.from_url(URL)
app = FastAPI()
app.add_middleware(
    stampede.asgi.IdempotencyMiddleware,
    idempotency=stampede.AsyncIdempotency(
        os.environ.get("IDEM_STORE_URL")
        or redis.asyncio.Redis.from_url(URL, socket_timeout=1, socket_connect_timeout=1),
        namespace=NS,
        lease_ttl=float(os.environ.get("IDEM_LEASE_TTL", "2")),
        on_conflict=os.environ.get("IDEM_ON_CONFLICT", "wait"),  # type: ignore[arg-type]
        wait_timeout=float(os.environ.get("IDEM_WAIT_TIMEOUT", "30")),
    ),
    scope=lambda scope: dict(scope["headers"]).get(b"x-tenant", b"public").decode() or None,
)


async def ran(route: str, request: Request) -> int:
    key = request.headers.get("idempotency-key", "")
    return int(await counter.incr(f"runs:{NS}:{route}:{key}"))


@app.get("/health")
async def health() -> dict[str, Any]:
    return {"pid": os.getpid()}


@app.post("/payments", status_code=201)
async def pay(request: Request, response: Response) -> dict[str, Any]:
    body = await request.json()
    runs = await ran("payments", request)
    claim = stampede.idempotency.current()
    while not await counter.exists(f"release:{NS}"):
        await asyncio.sleep(0.01)
    response.headers["Location"] = f"/payments/{body.get('order', '?')}"
    response.set_cookie("session", "secret")
    fence = claim.fence if claim else None
    return {"paid": body.get("amount"), "runs": runs, "pid": os.getpid(), "fence": fence}


@app.post("/empty", status_code=204)
async def empty(request: Request) -> Response:
    await ran("empty", request)
    return Response(status_code=204)


@app.post("/binary")
async def binary(request: Request) -> Response:
    await ran("binary", request)
    payload = bytes(range(256)) * 4
    return Response(
        gzip.compress(payload, mtime=0),
        media_type="application/octet-stream",
        headers={"Content-Encoding": "gzip"},
    )


@app.post("/fail")
async def fail(request: Request) -> JSONResponse:
    runs = await ran("fail", request)
    return JSONResponse({"runs": runs}, status_code=500 if runs == 1 else 200)


@app.post("/effect-fail")
async def effect_fail(request: Request) -> JSONResponse:
    runs = await ran("effect-fail", request)
    claim = stampede.idempotency.current()
    assert claim is not None
    claim.effect_started()
    return JSONResponse({"runs": runs}, status_code=502)


@app.post("/stream")
async def stream(request: Request) -> StreamingResponse:
    await ran("stream", request)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(5):
            yield f"chunk {i}\n".encode()

    return StreamingResponse(chunks(), media_type="text/plain")


@app.post("/slow")
async def slow(request: Request) -> dict[str, Any]:
    runs = await ran("slow", request)
    await asyncio.sleep(float(request.query_params.get("seconds", "1")))
    return {"runs": runs}
