"""Flask-Caching caches as stampede backends, with Flask itself (docs/integrations/flask.md).

Each test makes its own Flask app and ``flask_caching.Cache``; Redis-backed
ones point at the private servers of the fixtures (a Sentinel of the test's
own watches a private server). Cross-process claims run real processes
(tests/_framework_worker.py) that build the same app from the same config.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flask
import pytest
import redis
from flask_caching import Cache

import stampede
from stampede.backends import RedisBackend
from stampede.backends._flask import CachelibStore
from stampede.testing import Gate, wait_until

from ._frameworks import (
    AdapterConformance,
    lease_waiters,
    one_load_across_processes,
    run,
    stored_keys,
)
from .helpers import join_all, run_threads
from .support.redis_server import LocalCluster, RedisServer, pick_free_port

pytestmark = pytest.mark.timeout(60)


def flask_cache(config: dict[str, Any]) -> Cache:
    """A ``flask_caching.Cache`` on a new app configured with ``config``."""
    app = flask.Flask(__name__)
    app.config.update(config)
    return Cache(app)


@pytest.fixture
def local_configs(tmp_path: Path) -> dict[str, dict[str, Any]]:
    return {
        "simple": {"CACHE_TYPE": "SimpleCache"},
        "files": {"CACHE_TYPE": "FileSystemCache", "CACHE_DIR": str(tmp_path / "flask-files")},
    }


@pytest.fixture
def redis_configs(redis_url: str) -> dict[str, dict[str, Any]]:
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    return {
        "redis": {"CACHE_TYPE": "RedisCache", "CACHE_REDIS_URL": redis_url},
        "redis_host": {
            "CACHE_TYPE": "RedisCache",
            "CACHE_REDIS_HOST": "127.0.0.1",
            "CACHE_REDIS_PORT": port,
            "CACHE_REDIS_DB": 2,
        },
    }


# -- one process ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["simple", "files", "redis"])
def test_threads_share_one_load(kind: str, request: pytest.FixtureRequest) -> None:
    configs = request.getfixturevalue("redis_configs" if kind == "redis" else "local_configs")
    fc = flask_cache(configs[kind])
    cache: stampede.CoalescingCache[str] = stampede.CoalescingCache(fc, ttl=60)
    gate = Gate("value")
    got: list[str] = []
    threads = run_threads(8, lambda: got.append(cache.get_or_load("k", gate)))
    wait_until(lambda: cache.stats().coalesced == 7)
    gate.open()
    join_all(threads)
    assert gate.calls == 1
    assert got == ["value"] * 8
    again: stampede.CoalescingCache[str] = stampede.CoalescingCache(fc, ttl=60)
    assert again.get("k") == "value"


def test_a_cache_not_on_redis_goes_through_its_api(local_configs: dict[str, Any]) -> None:
    fc = flask_cache(local_configs["simple"])
    assert repr(stampede.CoalescingCache(fc).backend) == "CachelibStore(SimpleCache)"
    with fc.app.app_context():  # its backend, too
        assert isinstance(stampede.CoalescingCache(fc.cache).backend, CachelibStore)


@pytest.mark.parametrize("kind", ["redis", "redis_host"])
def test_a_redis_cache_gives_a_client_for_its_server(
    kind: str, redis_configs: dict[str, Any], redis_url: str
) -> None:
    config = redis_configs[kind]
    fc = flask_cache(config)
    cache: stampede.CoalescingCache[str] = stampede.CoalescingCache(fc, ttl=60)
    assert isinstance(cache.backend, RedisBackend)
    cache.set("k", "ours")
    fc.set("theirs", "flask's")
    db = config.get("CACHE_REDIS_DB", 0)
    keys = stored_keys(f"{redis_url.rsplit('/', 1)[0]}/{db}")
    assert "flask_cache_theirs" in keys
    assert any(key.startswith("stampede:") for key in keys), keys


def test_settings_of_the_cache_object_count_too(redis_configs: dict[str, Any]) -> None:
    app = flask.Flask(__name__)
    app.config.update(CACHE_TYPE="SimpleCache")  # the app's, overridden by the Cache's own
    fc = Cache(app, config=redis_configs["redis_host"])
    cache: stampede.CoalescingCache[str] = stampede.CoalescingCache(fc, ttl=60)
    assert isinstance(cache.backend, RedisBackend)
    assert cache.backend.client.get_connection_kwargs()["db"] == 2  # type: ignore[union-attr]


def test_a_client_given_as_the_host_is_used(redis_client: redis.Redis) -> None:
    fc = flask_cache({"CACHE_TYPE": "RedisCache", "CACHE_REDIS_HOST": redis_client})
    cache: stampede.CoalescingCache[str] = stampede.CoalescingCache(fc, ttl=60)
    assert cache.backend.given is redis_client  # type: ignore[union-attr]


def test_its_backend_is_found_in_the_app_context(redis_configs: dict[str, Any]) -> None:
    fc = flask_cache(redis_configs["redis"])
    with fc.app.app_context():
        cache: stampede.CoalescingCache[str] = stampede.CoalescingCache(fc.cache, ttl=60)
    assert isinstance(cache.backend, RedisBackend)
    cache.set("k", "v")
    assert stampede.CoalescingCache(fc, ttl=60).get("k") == "v"
    with pytest.raises(TypeError, match="pass the Cache"):
        stampede.CoalescingCache(fc.cache)  # outside: whose settings?


def test_a_cache_without_an_app_is_refused() -> None:
    with pytest.raises(TypeError, match=r"call cache\.init_app\(app\)"):
        stampede.CoalescingCache(Cache())


def test_settings_flask_caching_did_not_keep_are_not_guessed(redis_url: str) -> None:
    fc = Cache()
    fc.init_app(
        flask.Flask(__name__), config={"CACHE_TYPE": "RedisCache", "CACHE_REDIS_URL": redis_url}
    )
    with pytest.raises(TypeError, match="init_app"):
        stampede.CoalescingCache(fc)


def test_a_plain_cachelib_redis_cache_is_refused(redis_client: redis.Redis) -> None:
    from cachelib import RedisCache

    with pytest.raises(TypeError, match=r"redis\.Redis client for the same server"):
        stampede.CoalescingCache(RedisCache(host=redis_client))


def test_asyncio_is_refused_with_what_to_pass(redis_configs: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match=r"pass a redis\.asyncio client"):
        stampede.AsyncCoalescingCache(flask_cache(redis_configs["redis"]))
    with pytest.raises(TypeError, match=r"CachelibStore\(SimpleCache\) blocks"):
        stampede.AsyncCoalescingCache(flask_cache({"CACHE_TYPE": "SimpleCache"}))


def test_distributed_is_refused_on_the_adapter(local_configs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"distributed=True needs leases.*CachelibStore"):
        stampede.CoalescingCache(flask_cache(local_configs["simple"]), distributed=True)


def test_a_null_cache_stores_nothing_and_fails_nothing() -> None:
    fc = flask_cache({"CACHE_TYPE": "NullCache", "CACHE_NO_NULL_WARNING": True})
    cache: stampede.CoalescingCache[str] = stampede.CoalescingCache(fc, ttl=60)
    assert cache.get_or_load("k", lambda: "v") == "v"
    assert cache.get("k") is None
    assert cache.stats().backend_errors == 0


def test_redis_cluster_cache(redis_cluster: LocalCluster) -> None:
    redis_cluster.reset()
    nodes = ",".join(f"{host}:{port}" for host, port in redis_cluster.startup_nodes)
    fc = flask_cache({"CACHE_TYPE": "RedisClusterCache", "CACHE_REDIS_CLUSTER": nodes})
    cache: stampede.CoalescingCache[str] = stampede.CoalescingCache(fc, ttl=60, distributed=True)
    assert isinstance(cache.backend.client, redis.RedisCluster)  # type: ignore[union-attr]
    gate = Gate("value")
    got: list[str] = []
    threads = run_threads(4, lambda: got.append(cache.get_or_load("k", gate)))
    wait_until(lambda: cache.stats().coalesced == 3)
    gate.open()
    join_all(threads)
    assert gate.calls == 1
    assert stampede.CoalescingCache(fc, ttl=60).get("k") == "value"


@pytest.fixture
def sentinel(fresh_redis_server: RedisServer, tmp_path: Path) -> Iterator[int]:
    """A Sentinel of this test's own (a server binary in sentinel mode) watching
    ``fresh_redis_server`` as "mymaster": its port."""
    port = pick_free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor mymaster 127.0.0.1 {fresh_redis_server.port} 1\n"
    )
    log = (tmp_path / "sentinel.log").open("wb")
    proc = subprocess.Popen(
        [fresh_redis_server.binary.path, str(conf), "--sentinel"], stdout=log, stderr=log
    )
    try:
        with redis.Redis(port=port, socket_timeout=1) as client:

            def answers() -> bool:
                try:
                    return client.sentinel_get_master_addr_by_name("mymaster") is not None
                except redis.ConnectionError:
                    return False

            wait_until(answers, deadline=20, what="the sentinel")
        yield port
    finally:
        proc.kill()
        proc.wait(10)
        log.close()


def test_redis_sentinel_cache(sentinel: int, fresh_redis_server: RedisServer) -> None:
    fc = flask_cache(
        {
            "CACHE_TYPE": "RedisSentinelCache",
            "CACHE_REDIS_SENTINELS": [("127.0.0.1", sentinel)],
            "CACHE_REDIS_SENTINEL_MASTER": "mymaster",
        }
    )
    cache: stampede.CoalescingCache[str] = stampede.CoalescingCache(fc, ttl=60)
    assert isinstance(cache.backend, RedisBackend)
    assert cache.get_or_load("k", lambda: "through the sentinel") == "through the sentinel"
    assert any(key.startswith("stampede:") for key in stored_keys(fresh_redis_server.url))


# -- clear: stampede's keys only ------------------------------------------------------


@pytest.mark.parametrize("kind", ["simple", "files"])
def test_clear_drops_its_namespace_only(kind: str, local_configs: dict[str, Any]) -> None:
    fc = flask_cache(local_configs[kind])
    fc.set("theirs", "kept")
    a: stampede.CoalescingCache[int] = stampede.CoalescingCache(fc, ttl=60, namespace="a")
    b: stampede.CoalescingCache[int] = stampede.CoalescingCache(fc, ttl=60, namespace="b")
    a.set("k", 1)
    b.set("k", 2)
    a.clear()
    assert a.get("k") is None
    assert b.get("k") == 2
    assert fc.get("theirs") == "kept"


def test_cache_clear_drops_one_functions_keys(local_configs: dict[str, Any]) -> None:
    shared: stampede.CoalescingCache[int] = stampede.CoalescingCache(
        flask_cache(local_configs["simple"]), ttl=60
    )
    calls: list[str] = []

    @stampede.cached(cache=shared)
    def double(x: int) -> int:
        calls.append("double")
        return 2 * x

    @stampede.cached(cache=shared)
    def triple(x: int) -> int:
        calls.append("triple")
        return 3 * x

    assert (double(1), triple(1)) == (2, 3)
    double.cache_clear()
    assert (double(1), triple(1)) == (2, 3)
    assert calls == ["double", "triple", "double"]


# -- processes ---------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_distributed_loads_once_across_processes(
    redis_configs: dict[str, Any], redis_url: str, tmp_path: Path
) -> None:
    spec = {"framework": "flask", "config": redis_configs["redis"], "key": "k"}
    loads, results = one_load_across_processes(
        {**spec, "distributed": True}, tmp_path, lease_waiters(redis_url)
    )
    assert len(loads) == 1, loads
    assert len({value for r in results for value in r["values"]}) == 1
    assert sum(r["calls"] for r in results) == 12


def test_a_value_written_here_is_read_by_another_process(redis_configs: dict[str, Any]) -> None:
    cache: stampede.CoalescingCache[str] = stampede.CoalescingCache(
        flask_cache(redis_configs["redis"]), ttl=60
    )
    cache.set("k", "shared")
    spec = {"framework": "flask", "config": redis_configs["redis"], "key": "k"}
    assert run({**spec, "role": "read"})["value"] == "shared"


def test_adapter_timing_comes_from_the_store_not_the_writers_clock(
    local_configs: dict[str, Any],
) -> None:
    # The writer's monotonic clock runs 10^6 s ahead, as another host's may.
    spec = {"framework": "flask", "config": local_configs["files"], "clock_offset": 1e6}
    run({**spec, "role": "write", "key": "long", "value": "l", "ttl": 3600})
    short = run(
        {**spec, "role": "write", "key": "short", "value": "s", "ttl": 0.5, "stale_ttl": 3600}
    )
    gone = run({**spec, "role": "write", "key": "gone", "value": "g", "ttl": 0.5})
    reader: stampede.CoalescingCache[str] = stampede.CoalescingCache(
        flask_cache(local_configs["files"]), ttl=60, beta=0
    )
    assert reader.get("long") == "l"
    assert (reader.stats().hits, reader.stats().stale_served) == (1, 0)
    wait_until(lambda: time.time() > max(short["written_at"], gone["written_at"]) + 0.6)
    assert reader.get("short") == "s"
    assert reader.stats().stale_served == 1
    assert reader.get("gone") is None
    seen = run({**spec, "role": "read", "key": "short"})
    assert (seen["value"], seen["stale"]) == ("s", 1)


# -- the backend conformance suite, on the adapter --------------------------------


class TestSimpleCacheConformance(AdapterConformance):
    def make_backend(self) -> Any:
        return flask_cache({"CACHE_TYPE": "SimpleCache"})


class TestFileSystemCacheConformance(AdapterConformance):
    @pytest.fixture(autouse=True)
    def _folder(self, tmp_path: Path) -> None:
        self.folder = tmp_path / "flask-files"

    def make_backend(self) -> Any:
        return flask_cache({"CACHE_TYPE": "FileSystemCache", "CACHE_DIR": str(self.folder)})
