"""Django's caches as stampede backends, with Django itself (docs/integrations/django.md).

Django's settings are global to a process: this module configures them once
(a local-memory default) and each test swaps ``CACHES`` with Django's own
``override_settings``, which resets ``django.core.cache.caches``. Redis-backed
caches point at the private server of the fixtures. Cross-process claims run
real processes (tests/_framework_worker.py) that configure Django from the
same ``CACHES``.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import django
import pytest
from django.conf import settings

import stampede
from stampede.backends import RedisBackend
from stampede.backends._django import DjangoCacheStore
from stampede.backends._framework import framework_key, generation_key
from stampede.testing import Gate, wait_until

from ._frameworks import (
    ROOT,
    AdapterConformance,
    lease_waiters,
    one_load_across_processes,
    run,
    stored_keys,
)
from .helpers import join_all, run_threads

if not settings.configured:
    settings.configure(
        CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    )
    django.setup()

from django.core.cache import cache as default_cache
from django.core.cache import caches
from django.test.utils import override_settings

pytestmark = pytest.mark.timeout(60)

LOCMEM = "django.core.cache.backends.locmem.LocMemCache"


def _locmem() -> dict[str, Any]:
    return {"BACKEND": LOCMEM, "LOCATION": f"stampede-{uuid.uuid4().hex}"}


@pytest.fixture
def local_caches(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """CACHES without Redis: local memory (the default too) and files."""
    conf = {
        "default": _locmem(),
        "locmem": _locmem(),
        "files": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": str(tmp_path / "django-files"),
        },
    }
    with override_settings(CACHES=conf):
        yield conf


@pytest.fixture
def redis_caches(redis_url: str) -> Iterator[dict[str, Any]]:
    """CACHES on the private Redis: Django's RedisCache and django-redis's."""
    server = redis_url.rsplit("/", 1)[0]  # without its db: OPTIONS name one below
    conf = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": redis_url,
        },
        "redis": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": redis_url},
        "django_redis": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": redis_url},
        "redis_db3": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            # Django writes to the first server (reads may go to the others).
            "LOCATION": f"{server},{server.replace('127.0.0.1', '127.0.0.2')}",
            "OPTIONS": {"db": 3},
        },
    }
    with override_settings(CACHES=conf):
        yield conf


def django_cache(alias: str) -> Any:
    return default_cache if alias == "proxy" else caches[alias]


# -- one process ------------------------------------------------------------------


@pytest.mark.parametrize("alias", ["proxy", "locmem", "files", "redis", "django_redis"])
def test_threads_share_one_load(alias: str, request: pytest.FixtureRequest) -> None:
    request.getfixturevalue("redis_caches" if "redis" in alias else "local_caches")
    cache: stampede.CoalescingCache[str] = stampede.CoalescingCache(django_cache(alias), ttl=60)
    gate = Gate("value")
    got: list[str] = []
    threads = run_threads(8, lambda: got.append(cache.get_or_load("k", gate)))
    wait_until(lambda: cache.stats().coalesced == 7)
    gate.open()
    join_all(threads)
    assert gate.calls == 1
    assert got == ["value"] * 8
    # Stored where another cache on the same Django cache finds it.
    again: stampede.CoalescingCache[str] = stampede.CoalescingCache(django_cache(alias), ttl=60)
    assert again.get("k") == "value"


def test_a_cache_not_on_redis_goes_through_djangos_api(local_caches: dict[str, Any]) -> None:
    proxied = stampede.CoalescingCache(default_cache, ttl=60)
    assert repr(proxied.backend) == "DjangoCacheStore(caches['default'])"
    files = stampede.CoalescingCache(caches["files"], ttl=60)
    assert isinstance(files.backend, DjangoCacheStore)
    assert files.backend.alias == "files"


def test_djangos_redis_cache_gives_a_client_for_its_server(
    redis_caches: dict[str, Any], redis_url: str
) -> None:
    cache: stampede.CoalescingCache[str] = stampede.CoalescingCache(caches["redis"], ttl=60)
    assert isinstance(cache.backend, RedisBackend)
    cache.set("k", "ours")
    caches["redis"].set("theirs", "django's")
    keys = stored_keys(redis_url)
    assert ":1:theirs" in keys
    assert any(key.startswith("stampede:") for key in keys), keys


def test_the_client_follows_location_and_options(redis_caches: dict[str, Any]) -> None:
    cache: stampede.CoalescingCache[str] = stampede.CoalescingCache(caches["redis_db3"], ttl=60)
    cache.set("k", "in db 3")
    caches["redis_db3"].set("theirs", 1)
    url = redis_caches["redis"]["LOCATION"].rsplit("/", 1)[0]
    in_db3 = stored_keys(f"{url}/3")
    assert ":1:theirs" in in_db3
    assert any(key.startswith("stampede:") for key in in_db3), in_db3
    assert stored_keys(f"{url}/0") == set()


def test_django_redis_gives_its_own_client(redis_caches: dict[str, Any]) -> None:
    from django_redis import get_redis_connection

    cache: stampede.CoalescingCache[str] = stampede.CoalescingCache(caches["django_redis"], ttl=60)
    assert isinstance(cache.backend, RedisBackend)
    assert cache.backend.given is get_redis_connection("django_redis")


def test_caches_on_one_redis_share_entries(redis_caches: dict[str, Any]) -> None:
    writer: stampede.CoalescingCache[str] = stampede.CoalescingCache(caches["redis"], ttl=60)
    reader: stampede.CoalescingCache[str] = stampede.CoalescingCache(caches["django_redis"], ttl=60)
    writer.set("k", "shared")
    assert reader.get("k") == "shared"
    spec = {"framework": "django", "caches": redis_caches, "alias": "django_redis"}
    assert run({**spec, "role": "read", "key": "k"})["value"] == "shared"


def test_a_redis_cache_made_by_hand_is_refused(redis_caches: dict[str, Any]) -> None:
    from django.core.cache.backends.redis import RedisCache

    loose = RedisCache(redis_caches["redis"]["LOCATION"], {})
    with pytest.raises(TypeError, match=r"pass caches\[alias\]"):
        stampede.CoalescingCache(loose)


def test_asyncio_on_redis_is_refused_with_what_to_pass(redis_caches: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match=r"pass a redis\.asyncio client"):
        stampede.AsyncCoalescingCache(caches["redis"])


def test_asyncio_on_the_adapter_is_refused(local_caches: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match=r"DjangoCacheStore\(caches\['locmem'\]\) blocks"):
        stampede.AsyncCoalescingCache(caches["locmem"])


def test_distributed_is_refused_on_the_adapter(local_caches: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"distributed=True needs leases.*DjangoCacheStore"):
        stampede.CoalescingCache(caches["locmem"], distributed=True)


# -- clear: stampede's keys only ------------------------------------------------------


def test_clear_drops_its_namespace_only(local_caches: dict[str, Any]) -> None:
    store = caches["locmem"]
    store.set("theirs", "kept")
    a: stampede.CoalescingCache[int] = stampede.CoalescingCache(store, ttl=60, namespace="a")
    b: stampede.CoalescingCache[int] = stampede.CoalescingCache(store, ttl=60, namespace="b")
    a.set("k", 1)
    b.set("k", 2)
    a.clear()
    assert a.get("k") is None
    assert b.get("k") == 2
    assert store.get("theirs") == "kept"
    a.set("k", 3)  # usable after a clear, under the new generation
    assert a.get("k") == 3


def test_cache_clear_drops_one_functions_keys(local_caches: dict[str, Any]) -> None:
    shared: stampede.CoalescingCache[int] = stampede.CoalescingCache(caches["locmem"], ttl=60)
    calls: list[str] = []

    @stampede.cached(cache=shared)
    def double(x: int) -> int:
        calls.append("double")
        return 2 * x

    @stampede.cached(cache=shared)
    def triple(x: int) -> int:
        calls.append("triple")
        return 3 * x

    shared.set("plain", 7)
    assert (double(1), triple(1)) == (2, 3)
    double.cache_clear()
    assert (double(1), triple(1)) == (2, 3)
    assert calls == ["double", "triple", "double"]
    assert shared.get("plain") == 7


def test_clear_is_seen_by_other_processes(local_caches: dict[str, Any]) -> None:
    cache: stampede.CoalescingCache[str] = stampede.CoalescingCache(caches["files"], ttl=60)
    cache.set("k", "before")
    spec = {"framework": "django", "caches": local_caches, "alias": "files", "key": "k"}
    assert run({**spec, "role": "read"})["value"] == "before"
    cache.clear()
    assert run({**spec, "role": "read"})["value"] is None


def test_clear_by_any_other_prefix_is_refused(local_caches: dict[str, Any]) -> None:
    cache: stampede.CoalescingCache[int] = stampede.CoalescingCache(caches["locmem"], ttl=60)
    with pytest.raises(ValueError, match="cannot list keys"):
        cache.backend.clear("1:x:v1:")  # type: ignore[union-attr]


def test_a_lost_generation_makes_misses_not_old_values(local_caches: dict[str, Any]) -> None:
    store = caches["locmem"]
    cache: stampede.CoalescingCache[str] = stampede.CoalescingCache(store, ttl=60, namespace="n")
    cache.set("k", "old")
    cache.clear()
    store.delete(generation_key("1:n:v1:"))  # evicted, as a full cache may do
    assert cache.get("k") is None
    cache.set("k", "new")
    assert cache.get("k") == "new"


def test_a_foreign_value_is_a_counted_miss(local_caches: dict[str, Any]) -> None:
    from stampede._keys import encode_key

    store = caches["locmem"]
    store.set(framework_key(encode_key("", "k")), b"not an entry")
    cache: stampede.CoalescingCache[str] = stampede.CoalescingCache(store, ttl=60)
    assert cache.get("k") is None
    assert cache.stats().serialization_errors == 1
    assert cache.get_or_load("k", lambda: "loaded") == "loaded"


# -- processes ---------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("alias", ["redis", "django_redis"])
def test_distributed_loads_once_across_processes(
    alias: str, redis_caches: dict[str, Any], redis_url: str, tmp_path: Path
) -> None:
    spec = {"framework": "django", "caches": redis_caches, "alias": alias, "key": "k"}
    loads, results = one_load_across_processes(
        {**spec, "distributed": True}, tmp_path, lease_waiters(redis_url)
    )
    assert len(loads) == 1, loads
    assert len({value for r in results for value in r["values"]}) == 1
    assert sum(r["calls"] for r in results) == 12
    assert all(r["backend"].startswith("RedisBackend(") for r in results)


def test_adapter_timing_comes_from_the_store_not_the_writers_clock(
    local_caches: dict[str, Any],
) -> None:
    # The writer's monotonic clock runs 10^6 s ahead, as another host's may: had it
    # been written into the store, this process would see "short" fresh for days.
    spec = {"framework": "django", "caches": local_caches, "alias": "files", "clock_offset": 1e6}
    run({**spec, "role": "write", "key": "long", "value": "l", "ttl": 3600})
    short = run(
        {**spec, "role": "write", "key": "short", "value": "s", "ttl": 0.5, "stale_ttl": 3600}
    )
    gone = run({**spec, "role": "write", "key": "gone", "value": "g", "ttl": 0.5})
    reader: stampede.CoalescingCache[str] = stampede.CoalescingCache(
        caches["files"], ttl=60, beta=0
    )
    assert reader.get("long") == "l"
    assert (reader.stats().hits, reader.stats().stale_served) == (1, 0)  # fresh
    wait_until(lambda: time.time() > max(short["written_at"], gone["written_at"]) + 0.6)
    assert reader.get("short") == "s"
    assert reader.stats().stale_served == 1  # past its ttl, within its stale_ttl
    assert reader.get("gone") is None  # past both
    # A reader whose monotonic clock is skewed sees the same.
    seen = run({**spec, "role": "read", "key": "short"})
    assert (seen["value"], seen["stale"]) == ("s", 1)


def test_stampede_imports_no_framework() -> None:
    code = (
        "import sys, stampede\n"
        "stampede.CoalescingCache({}, ttl=1)\n"
        "stampede.CoalescingCache('memory://', ttl=1)\n"
        "try:\n"
        "    stampede.CoalescingCache(object())\n"
        "except TypeError:\n"
        "    pass\n"
        "loaded = {m.split('.')[0] for m in sys.modules}\n"
        "assert not loaded & {'django', 'flask', 'flask_caching', 'cachelib'}, loaded\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


# -- the backend conformance suite, on the adapter --------------------------------


class TestLocMemConformance(AdapterConformance):
    @pytest.fixture(autouse=True)
    def _settings(self, local_caches: dict[str, Any]) -> None:
        pass

    def make_backend(self) -> Any:
        return caches["locmem"]


class TestFileBasedConformance(TestLocMemConformance):
    def make_backend(self) -> Any:
        return caches["files"]
