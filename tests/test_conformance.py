"""The backend conformance suite (stampede.testing.conformance) run on our own stores.

Redis runs on private servers only (tests/redis_fixtures.py), never on 6379.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cachebox
import cachetools
import pytest
import redis

from stampede.backends import DiskBackend, MemoryBackend, RedisBackend
from stampede.testing.conformance import BackendConformance
from tests.support.redis_server import RedisServer


class TestDict(BackendConformance):
    def make_backend(self) -> dict[Any, Any]:
        return {}


class TestTTLCache(BackendConformance):
    def make_backend(self) -> cachetools.TTLCache[Any, Any]:
        return cachetools.TTLCache(maxsize=1000, ttl=3600)


class TestDefaultLRU(BackendConformance):
    def make_backend(self) -> MemoryBackend:
        return MemoryBackend()

    def test_the_default_store_is_cachebox(self, backend: MemoryBackend) -> None:
        assert isinstance(backend.mapping, cachebox.LRUCache)


class TestDisk(BackendConformance):
    """A DiskBackend on a fresh owner-only folder; damage written with diskcache itself."""

    @pytest.fixture(autouse=True)
    def _folder(self, tmp_path: Path) -> Iterator[None]:
        self.folder = tmp_path / "cache"
        self.made: list[DiskBackend] = []
        yield
        for store in self.made:
            store.cache.close()

    def make_backend(self) -> DiskBackend:
        store = DiskBackend(str(self.folder))  # creates the folder, mode 0700
        self.made.append(store)
        return store

    def damage(self, backend: DiskBackend, key: str, data: bytes) -> None:
        backend.cache.set(key, data, expire=60)

    def test_the_folder_is_owner_only(self, backend: DiskBackend) -> None:
        assert stat.S_IMODE(os.stat(self.folder).st_mode) == 0o700


class TestRedisClient(BackendConformance):
    """A redis.Redis client on the private server; damage written with the client."""

    @pytest.fixture(autouse=True)
    def _server(self, redis_url: str) -> None:
        self.url = redis_url

    def make_backend(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def damage(self, backend: redis.Redis, key: str, data: bytes) -> None:
        backend.set(key, data, px=60_000)


class TestRedisFlavors(BackendConformance):
    """A RedisBackend on redis and on valkey; damage through the store's own writer."""

    @pytest.fixture(autouse=True)
    def _server(self, any_redis_server: RedisServer) -> Iterator[None]:
        self.url = any_redis_server.url
        self.made: list[RedisBackend] = []
        yield
        for store in self.made:
            store.client.close()

    def make_backend(self) -> RedisBackend:
        store = RedisBackend.from_url(self.url)
        self.made.append(store)
        return store
