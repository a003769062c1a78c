"""Pytest fixtures for tests against a real, private Redis/Valkey server.

Built on ``tests.support.redis_server``. Load them in any of these ways:
``pytest_plugins = ["tests.redis_fixtures"]`` in the root ``conftest.py``,
``from tests.redis_fixtures import *`` there (``__all__`` lists every
fixture, including the ``redis_server_pool`` that ``any_redis_server`` needs),
or ``pytest -p tests.redis_fixtures``.

Fixtures:

- ``redis_server`` (session): one private server for the whole run, on a free
  loopback port (checked to not be 6379).
- ``redis_url`` (function): that server's ``redis://127.0.0.1:N/0``, reset
  before the test (FLUSHALL; resumed or restarted if an earlier test left it
  frozen, paused or dead).
- ``redis_client`` (function): a ``redis.Redis`` on ``redis_url`` (1 s
  timeouts, no retries), closed after the test.
- ``aredis_client`` (function): a factory ``make_async_client(**kwargs)`` of
  ``redis.asyncio.Redis`` clients on ``redis_url``, for tests that run their own
  loop with ``asyncio.run``; the test closes each client (``await c.aclose()``).
- ``fresh_redis_server`` (function): a server of the test's own, for fault
  tests that kill, freeze or restart it; stopped after the test.
- ``redis_cluster`` (session): a private 3-master Redis Cluster
  (``LocalCluster``), started on first use; tests empty it with ``reset()``.
- ``any_redis_server`` (function, parametrized ``redis`` / ``valkey``): a reset
  server of each flavor whose binary is present (the other param skips);
  servers come from the session-scoped ``redis_server_pool``.

No binary at all makes these fixtures skip, naming the three ways to get one;
with ``STAMPEDE_REQUIRE_REDIS=1`` (CI) that is a failure instead. A set but
broken ``STAMPEDE_REDIS_SERVER`` always fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from tests.support.redis_server import (
    BINARY_ENV,
    MISSING_BINARY_MESSAGE,
    REQUIRE_ENV,
    SHARED_DEFAULT_PORT,
    LocalCluster,
    RedisServer,
    ServerBinary,
    ServerBinaryError,
    find_server_binaries_by_flavor,
    find_server_binary,
    redis_required,
)

if TYPE_CHECKING:
    import redis
    import redis.asyncio

__all__ = [
    "RedisServerPool",
    "any_redis_server",
    "aredis_client",
    "fresh_redis_server",
    "redis_client",
    "redis_cluster",
    "redis_server",
    "redis_server_pool",
    "redis_url",
    "server_binary_or_skip",
]

FLAVORS = ("redis", "valkey")


def _no_server(message: str) -> NoReturn:
    if redis_required():
        pytest.fail(
            f"{message} ({REQUIRE_ENV} is set, so a missing server is a failure, not a skip)",
            pytrace=False,
        )
    pytest.skip(message)


def server_binary_or_skip() -> ServerBinary:
    """The server binary to use, or skip (fail under ``STAMPEDE_REQUIRE_REDIS=1``)."""
    try:
        binary = find_server_binary()
    except ServerBinaryError as exc:
        pytest.fail(f"unusable Redis server binary ({BINARY_ENV}?): {exc}", pytrace=False)
    if binary is None:
        _no_server(MISSING_BINARY_MESSAGE)
    return binary


def _check_private(server: RedisServer) -> None:
    assert server.port != SHARED_DEFAULT_PORT, "refusing to test against port 6379"
    assert server.running, f"the private server is not running: {server!r}"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private server for the test session."""
    with RedisServer(server_binary_or_skip()) as server:
        _check_private(server)
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server's URL, emptied (FLUSHALL on it alone) for this test."""
    redis_server.reset()
    _check_private(redis_server)
    return redis_server.url


@pytest.fixture
def redis_client(redis_server: RedisServer, redis_url: str) -> Iterator[redis.Redis]:
    """A sync client on the emptied session server; closed after the test."""
    client = redis_server.client()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def aredis_client(redis_server: RedisServer, redis_url: str) -> Callable[..., redis.asyncio.Redis]:
    """``make_async_client(**kwargs)`` -> ``redis.asyncio.Redis`` on the emptied
    session server. Create it inside the loop that uses it; the test closes it."""

    def make_async_client(**kwargs: Any) -> redis.asyncio.Redis:
        return redis_server.async_client(**kwargs)

    return make_async_client


@pytest.fixture
def fresh_redis_server() -> Iterator[RedisServer]:
    """A private server for this test only (kill, freeze, restart at will)."""
    with RedisServer(server_binary_or_skip()) as server:
        _check_private(server)
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    """A private Redis Cluster (3 masters, no replicas) for the test session."""
    with LocalCluster(masters=3, binary=server_binary_or_skip()) as cluster:
        for node in cluster.nodes:
            _check_private(node)
        yield cluster


class RedisServerPool:
    """Session servers by flavor (``"redis"``, ``"valkey"``), started on first use."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self._servers: dict[str, RedisServer] = {}
        self._binaries: dict[str, ServerBinary] | None = None

    def binaries(self) -> dict[str, ServerBinary]:
        if self._binaries is None:
            try:
                self._binaries = find_server_binaries_by_flavor()
            except ServerBinaryError as exc:
                pytest.fail(f"unusable Redis server binary ({BINARY_ENV}?): {exc}", pytrace=False)
        return self._binaries

    def get(self, flavor: str) -> RedisServer:
        """The running server of ``flavor``; skips if there is no such binary."""
        server = self._servers.get(flavor)
        if server is None:
            binaries = self.binaries()
            if not binaries:
                _no_server(MISSING_BINARY_MESSAGE)
            binary = binaries.get(flavor)
            if binary is None:
                found = ", ".join(f"{b.flavor} ({b.path})" for b in binaries.values())
                pytest.skip(f"no {flavor} server binary here; found only {found}")
            server = self._stack.enter_context(RedisServer(binary))
            self._servers[flavor] = server
        return server

    def close(self) -> None:
        self._stack.close()


@pytest.fixture(scope="session")
def redis_server_pool() -> Iterator[RedisServerPool]:
    """The session's servers by flavor, for ``any_redis_server``."""
    pool = RedisServerPool()
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(params=FLAVORS, ids=FLAVORS)
def any_redis_server(
    request: pytest.FixtureRequest, redis_server_pool: RedisServerPool
) -> RedisServer:
    """Each available flavor's session server, emptied for this test."""
    server = redis_server_pool.get(request.param)
    server.reset()
    _check_private(server)
    return server
