"""The lease-store conformance suite (stampede.testing.leases) on every store that
holds leases: Redis (and Valkey), diskcache, and the in-memory fake the leader's
unit tests use (which must behave like the real ones to stand in for them)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from stampede.backends import DiskBackend, RedisBackend, SharedStore
from stampede.testing.leases import LeaseStoreConformance
from tests.support.fake_leases import DictLeaseStore
from tests.support.redis_server import RedisServer


class TestDictLeaseStore(LeaseStoreConformance):
    def make_store(self) -> SharedStore:
        return DictLeaseStore()


class TestDiskLeases(LeaseStoreConformance):
    @pytest.fixture(autouse=True)
    def _folder(self, tmp_path: Path) -> Iterator[None]:
        self.folder = tmp_path / "cache"
        self.made: list[DiskBackend] = []
        yield
        for store in self.made:
            store.cache.close()

    def make_store(self) -> SharedStore:
        store = DiskBackend(str(self.folder))
        self.made.append(store)
        return store


class TestRedisLeases(LeaseStoreConformance):
    """On redis-server and valkey-server, whichever binaries the machine has."""

    @pytest.fixture(autouse=True)
    def _server(self, any_redis_server: RedisServer) -> Iterator[None]:
        self.url = any_redis_server.url
        self.made: list[RedisBackend] = []
        yield
        for store in self.made:
            store.client.close()

    def make_store(self) -> SharedStore:
        store = RedisBackend.from_url(self.url)
        self.made.append(store)
        return store
