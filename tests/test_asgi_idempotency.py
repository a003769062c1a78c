"""The ``Idempotency-Key`` middleware over HTTP: uvicorn with two workers, a real
HTTP client, a private Redis (DESIGN.md item 38)."""

from __future__ import annotations

import asyncio
import gzip
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

for _module in ("fastapi", "uvicorn", "httpx"):
    pytest.importorskip(_module, reason=f"the HTTP tests need {_module} (pip install -e '.[test]')")

import httpx  # noqa: E402
import redis  # noqa: E402

from stampede.asgi import parse_key  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKERS = int(os.environ.get("IDEM_TEST_WORKERS", "2"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``uvicorn tests._idem_app:app --workers 2`` on a free loopback port."""

    def __init__(self, redis_url: str, **env: str) -> None:
        self.namespace = f"n{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.redis_url = redis_url
        self.env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "IDEM_NAMESPACE": self.namespace,
            "PYTHONPATH": str(ROOT),
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "tests._idem_app:app", "--port", str(self.port),
             "--workers", str(WORKERS), "--log-level", "warning"],
            cwd=ROOT,
            env=self.env,
        )
        end = time.monotonic() + 60
        pids: set[int] = set()
        while len(pids) < WORKERS:  # every worker answering
            assert time.monotonic() < end, "uvicorn did not start"
            try:
                with httpx.Client(timeout=1) as client:  # a fresh connection: any worker
                    pids.add(client.get(self.url + "/health").json()["pid"])
            except httpx.HTTPError:
                time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def runs(self, route: str, key: str) -> int:
        client = redis.Redis.from_url(self.redis_url)
        return int(client.get(f"runs:{self.namespace}:{route}:{key}") or 0)

    def release(self) -> None:
        redis.Redis.from_url(self.redis_url).set(f"release:{self.namespace}", 1)


@pytest.fixture
def server(redis_url: str) -> Iterator[Server]:
    with Server(redis_url) as running:
        yield running


@pytest.fixture(params=["redis", "postgres"])
def any_server(request: pytest.FixtureRequest, redis_url: str) -> Iterator[Server]:
    """The app with its records in Redis, then in PostgreSQL (the middleware unchanged)."""
    env = {}
    if request.param == "postgres":
        env["IDEM_STORE_URL"] = request.getfixturevalue("pg_url")
    with Server(redis_url, **env) as running:
        yield running


async def post(
    url: str, path: str, key: str | None = None, json: Any = None, **headers: str
) -> httpx.Response:
    sent = dict(headers)
    if key is not None:
        sent["Idempotency-Key"] = key
    async with httpx.AsyncClient(timeout=30) as client:  # a connection each: any worker
        return await client.post(url + path, json=json, headers=sent)


@pytest.mark.timeout(120)
def test_concurrent_duplicates_across_workers_run_once(any_server: Server) -> None:
    server = any_server

    async def main() -> list[httpx.Response]:
        requests = [
            asyncio.create_task(post(server.url, "/payments", "pay-1", {"order": 7, "amount": 5}))
            for _ in range(20)
        ]
        end = time.monotonic() + 30
        while server.runs("payments", "pay-1") == 0:
            assert time.monotonic() < end
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # the others reach the claim and wait on it
        server.release()
        return list(await asyncio.gather(*requests))

    responses = asyncio.run(main())
    assert server.runs("payments", "pay-1") == 1
    assert {r.status_code for r in responses} == {201}
    assert len({r.content for r in responses}) == 1
    first = [r for r in responses if "idempotent-replayed" not in r.headers]
    assert len(first) == 1 and "set-cookie" in first[0].headers
    replayed = [r for r in responses if r.headers.get("idempotent-replayed") == "true"]
    assert len(replayed) == 19
    for response in replayed:
        assert response.headers["location"] == "/payments/7"
        assert "set-cookie" not in response.headers  # never stored


@pytest.mark.timeout(120)
def test_replays_are_byte_identical(any_server: Server) -> None:
    server = any_server

    server.release()

    async def main() -> None:
        for path in ("/payments", "/empty", "/binary"):
            key = f"k-{path}"
            first = await post(server.url, path, key, {"order": 1, "amount": 2})
            again = await post(server.url, path, key, {"order": 1, "amount": 2})
            assert (first.status_code, first.content) == (again.status_code, again.content)
            assert again.headers["idempotent-replayed"] == "true"
            assert server.runs(path[1:], key) == 1
            if path == "/binary":
                assert again.headers["content-encoding"] == "gzip"
                assert again.content == bytes(range(256)) * 4  # decoded by the client
            if path == "/empty":
                assert first.status_code == 204 and again.content == b""

    asyncio.run(main())
    raw = gzip.compress(bytes(range(256)) * 4, mtime=0)
    with httpx.Client() as client:
        response = client.post(
            server.url + "/binary",
            json={"order": 1, "amount": 2},
            headers={"Idempotency-Key": "k-/binary"},
        )
        assert response.headers["idempotent-replayed"] == "true"
        assert gzip.compress(response.content, mtime=0) == raw


@pytest.mark.timeout(120)
def test_a_different_request_with_the_key_is_422_while_running_and_after(server: Server) -> None:
    async def main() -> None:
        first = asyncio.create_task(post(server.url, "/payments", "k", {"order": 1, "amount": 5}))
        end = time.monotonic() + 30
        while server.runs("payments", "k") == 0:
            assert time.monotonic() < end
            await asyncio.sleep(0.01)
        running = await post(server.url, "/payments", "k", {"order": 1, "amount": 9})
        assert running.status_code == 422
        assert running.headers["content-type"] == "application/problem+json"
        server.release()
        assert (await first).status_code == 201
        after = await post(server.url, "/payments", "k", {"order": 1, "amount": 9})
        assert after.status_code == 422
        # The same JSON with its fields in another order is the same request.
        same = await post(server.url, "/payments", "k", {"amount": 5, "order": 1})
        assert same.status_code == 201 and same.headers["idempotent-replayed"] == "true"

    asyncio.run(main())
    assert server.runs("payments", "k") == 1


@pytest.mark.timeout(120)
def test_bad_keys_are_400(server: Server) -> None:
    server.release()

    async def main() -> None:
        assert (await post(server.url, "/empty")).status_code == 400  # missing
        for bad in ("", "x" * 256, '"unterminated', "tab\there", '"a"b"'):
            response = await post(server.url, "/empty", bad)
            assert response.status_code == 400, bad
            assert response.json()["type"].endswith("invalid-key")
        async with httpx.AsyncClient() as client:
            two = await client.post(
                server.url + "/empty",
                headers=[("Idempotency-Key", "a"), ("Idempotency-Key", "b")],
            )
            assert two.status_code == 400
            non_ascii = await client.post(
                server.url + "/empty", headers=[(b"Idempotency-Key", "clé".encode())]
            )
            assert non_ascii.status_code == 400
        # Quoted and bare spellings of one key are one key.
        assert (await post(server.url, "/empty", '"same-key"')).status_code == 204
        bare = await post(server.url, "/empty", "same-key")
        assert bare.headers["idempotent-replayed"] == "true"
        assert (await post(server.url, "/empty", "x" * 255)).status_code == 204

    asyncio.run(main())


def test_key_parsing() -> None:
    assert parse_key(b"abc") == parse_key(b'"abc"') == "abc"
    assert parse_key(b'"a b\\"c"') == 'a b"c'
    for bad in (b"", b"a b", b"\x7f", b'"a\\x"', b'"', "é".encode(), b"a,b", b"abc;x=1"):
        assert parse_key(bad) is None


@pytest.mark.timeout(120)
def test_failures_release_unless_the_effect_started(server: Server) -> None:
    async def main() -> None:
        assert (await post(server.url, "/fail", "f")).status_code == 500
        retry = await post(server.url, "/fail", "f")  # released: it runs again
        assert retry.status_code == 200 and "idempotent-replayed" not in retry.headers
        assert server.runs("fail", "f") == 2
        assert (await post(server.url, "/effect-fail", "e")).status_code == 502
        replay = await post(server.url, "/effect-fail", "e")
        assert replay.status_code == 502 and replay.headers["idempotent-replayed"] == "true"
        assert server.runs("effect-fail", "e") == 1

    asyncio.run(main())


@pytest.mark.timeout(120)
def test_a_streamed_response_is_never_run_twice(server: Server) -> None:
    async def main() -> None:
        first = await post(server.url, "/stream", "s")
        assert first.status_code == 200 and first.text == "".join(f"chunk {i}\n" for i in range(5))
        retry = await post(server.url, "/stream", "s")
        assert retry.status_code == 409
        assert retry.json()["type"].endswith("replay-unavailable")
        assert server.runs("stream", "s") == 1

    asyncio.run(main())


@pytest.mark.timeout(120)
def test_callers_are_scoped_and_an_empty_identity_is_refused(server: Server) -> None:
    server.release()

    async def main() -> None:
        a = await post(server.url, "/payments", "same", {"order": 1}, **{"x-tenant": "a"})
        b = await post(server.url, "/payments", "same", {"order": 2}, **{"x-tenant": "b"})
        assert a.status_code == b.status_code == 201  # two tenants: two records
        assert "idempotent-replayed" not in b.headers
        none = await post(server.url, "/payments", "same", {"order": 1}, **{"x-tenant": ""})
        assert none.status_code == 400 and none.json()["type"].endswith("identity-unavailable")

    asyncio.run(main())


@pytest.mark.timeout(120)
def test_a_client_that_disconnects_does_not_stop_the_work(server: Server) -> None:
    async def main() -> None:
        with pytest.raises(httpx.ReadTimeout):
            async with httpx.AsyncClient(timeout=0.3) as client:
                await client.post(
                    server.url + "/slow?seconds=1.5", headers={"Idempotency-Key": "gone"}
                )
        retry = await post(server.url, "/slow?seconds=1.5", "gone")
        assert retry.status_code == 200 and retry.headers["idempotent-replayed"] == "true"
        assert retry.json() == {"runs": 1}

    asyncio.run(main())
    assert server.runs("slow", "gone") == 1


@pytest.mark.timeout(120)
def test_in_flight_in_reject_mode_is_409_with_retry_after(redis_url: str) -> None:
    with Server(redis_url, IDEM_ON_CONFLICT="reject") as server:

        async def main() -> None:
            first = asyncio.create_task(post(server.url, "/payments", "r", {"order": 1}))
            end = time.monotonic() + 30
            while server.runs("payments", "r") == 0:
                assert time.monotonic() < end
                await asyncio.sleep(0.01)
            busy = await post(server.url, "/payments", "r", {"order": 1})
            assert busy.status_code == 409, (busy.text, server.runs("payments", "r"))
            assert int(busy.headers["retry-after"]) >= 1
            server.release()
            done = await first
            assert done.status_code == 201, (done.text, busy.text, server.runs("payments", "r"))

        asyncio.run(main())


@pytest.mark.timeout(120)
def test_store_down_is_503(redis_url: str) -> None:
    closed = free_port()
    with Server(f"redis://127.0.0.1:{closed}/0") as server:
        response = asyncio.run(post(server.url, "/empty", "k"))
        assert response.status_code == 503 and "retry-after" in response.headers
        assert response.json()["type"].endswith("store-unavailable")


# -- the middleware alone, on an in-process store -------------------------------------------------


def _app_answering(status: int, gate: asyncio.Event | None = None) -> Any:
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def endpoint(request: Any) -> Response:
        await request.body()
        if gate is not None:
            await gate.wait()
        response = Response(b"body", status_code=status)
        response.set_cookie("session", "secret")
        return response

    return Starlette(routes=[Route("/", endpoint, methods=["POST"])])


def test_a_released_response_reaches_joiners_without_its_cookie() -> None:
    import stampede
    from stampede.asgi import IdempotencyMiddleware

    async def main() -> None:
        gate = asyncio.Event()
        app = IdempotencyMiddleware(
            _app_answering(500, gate), idempotency=stampede.AsyncIdempotency()
        )
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            headers = {"Idempotency-Key": "k"}
            first = asyncio.create_task(client.post("/", headers=headers))
            second = asyncio.create_task(client.post("/", headers=headers))
            for _ in range(50):
                await asyncio.sleep(0)
            gate.set()
            ran, joined = await first, await second
        assert ran.status_code == joined.status_code == 500
        assert "set-cookie" in ran.headers and "idempotent-replayed" not in ran.headers
        assert "set-cookie" not in joined.headers  # never handed to another caller
        assert joined.headers["idempotent-replayed"] == "true"

    asyncio.run(asyncio.wait_for(main(), 10))


def test_a_request_whose_client_left_mid_body_never_runs() -> None:
    import stampede
    from stampede.asgi import IdempotencyMiddleware

    runs = 0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal runs
        runs += 1

    async def main() -> None:
        middleware = IdempotencyMiddleware(app, idempotency=stampede.AsyncIdempotency())
        messages = [
            {"type": "http.request", "body": b'{"amount":', "more_body": True},
            {"type": "http.disconnect"},
        ]
        sent: list[Any] = []

        async def receive() -> Any:
            return messages.pop(0)

        async def send(message: Any) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/",
            "query_string": b"",
            "headers": [(b"idempotency-key", b"k")],
        }
        await middleware(scope, receive, send)
        assert sent == [] and runs == 0

    asyncio.run(main())
