"""The Prometheus and OpenTelemetry metrics hooks, against the real libraries."""

from __future__ import annotations

import asyncio
import gc
import logging
import subprocess
import sys
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import prometheus_client
import pytest
import redis
import redis.asyncio
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import stampede
from stampede import AsyncCoalescingCache, CoalescingCache, Stats, cached
from stampede._stats import _FIELDS
from stampede.backends.redis import AsyncRedisBackend, RedisBackend
from stampede.metrics import _common
from stampede.metrics.opentelemetry import DEFAULT_BUCKETS as OTEL_BUCKETS
from stampede.metrics.opentelemetry import SCOPE, OpenTelemetryMetrics
from stampede.metrics.prometheus import PrometheusMetrics
from stampede.testing import AsyncGate, FakeClock, Gate, async_wait_until, wait_until
from tests.support.redis_server import RedisServer

from .helpers import join_all

COUNTED = [name for name in _FIELDS if name not in ("hits", "near_hits")]

# -- driving real caches ---------------------------------------------------------


def drive_sync(cache: CoalescingCache[str], clock: FakeClock) -> None:
    """A miss and load, a hit, a load error and its negative hit, a stale read."""

    def load() -> str:
        clock.advance(0.5)
        return "v"

    def fail() -> str:
        clock.advance(0.25)
        raise KeyError("gone")

    assert cache.get_or_load("k", load) == "v"  # miss, load
    assert cache.get_or_load("k", load) == "v"  # hit
    with pytest.raises(KeyError):
        cache.get_or_load("bad", fail)  # miss, load error (cached)
    with pytest.raises(KeyError):
        cache.get_or_load("bad", fail)  # negative hit
    clock.advance(10.5)  # past ttl, within stale_ttl
    assert cache.get_or_load("k", load) == "v"  # stale served, refreshed in the background
    wait_until(lambda: len(cache._flight) == 0, what="the background refresh")


def sync_cache(metrics: Any, clock: FakeClock, name: str = "users") -> CoalescingCache[str]:
    return CoalescingCache(
        ttl=10,
        stale_ttl=60,
        beta=0,  # no early refresh: the stale read is the only background load
        cache_errors=(KeyError,),
        error_ttl=5,
        name=name,
        metrics=metrics,
        clock=clock,
    )


def coalesce_threads(cache: CoalescingCache[str]) -> None:
    """One leader, one waiter, ordered by events: the waiter's wait is timed."""
    gate = Gate("v")
    leader = threading.Thread(target=cache.get_or_load, args=("w", gate))
    leader.start()
    assert gate.entered.wait(10)
    waiter = threading.Thread(target=cache.get_or_load, args=("w", gate))
    waiter.start()
    wait_until(lambda: cache.stats().coalesced == 1, what="the waiter")
    gate.open()
    join_all([leader, waiter])
    assert gate.calls == 1


async def drive_async(cache: AsyncCoalescingCache[str]) -> None:
    """A miss and load, a hit, and a coalesced wait."""
    assert await cache.get_or_load("k", lambda: "v") == "v"
    assert await cache.get_or_load("k", lambda: "v") == "v"
    gate: AsyncGate[str] = AsyncGate("w")
    leader = asyncio.create_task(cache.get_or_load("w", gate))
    await gate.entered.wait()
    waiter = asyncio.create_task(cache.get_or_load("w", gate))
    await async_wait_until(lambda: cache.stats().coalesced == 1, what="the waiter")
    gate.open()
    assert list(await asyncio.gather(leader, waiter)) == ["w", "w"]
    assert gate.calls == 1


# -- Prometheus --------------------------------------------------------------------


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def assert_prometheus_matches(registry: CollectorRegistry, cache: str, stats: Stats) -> None:
    for event in COUNTED:
        assert sample(registry, f"stampede_{event}_total", cache=cache) == getattr(stats, event), (
            event
        )
    assert sample(registry, "stampede_hits_total", cache=cache) == stats.hits
    load = "stampede_load_duration_seconds_count"
    assert sample(registry, load, cache=cache, outcome="ok") == stats.loads
    assert sample(registry, load, cache=cache, outcome="error") == stats.load_errors
    waits = sample(registry, "stampede_wait_duration_seconds_count", cache=cache)
    assert waits == stats.coalesced


def test_prometheus_counters_match_stats(registry: CollectorRegistry) -> None:
    clock = FakeClock()
    metrics = PrometheusMetrics(registry)
    cache = metrics.watch(sync_cache(metrics, clock))
    drive_sync(cache, clock)
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.loads, stats.load_errors) == (1, 2, 2, 1)
    assert (stats.negative_hits, stats.stale_served) == (1, 1)
    assert_prometheus_matches(registry, "users", stats)
    # The fake clock makes durations exact: the histograms saw every load.
    load_sum = sum(
        sample(registry, "stampede_load_duration_seconds_sum", cache="users", outcome=o)
        for o in ("ok", "error")
    )
    assert load_sum == pytest.approx(stats.load_time) == pytest.approx(1.25)
    bucket = "stampede_load_duration_seconds_bucket"
    assert sample(registry, bucket, cache="users", outcome="ok", le="+Inf") == 2
    assert sample(registry, bucket, cache="users", outcome="ok", le="0.25") == 0
    assert sample(registry, bucket, cache="users", outcome="error", le="0.25") == 1


def test_prometheus_times_coalesced_waits(registry: CollectorRegistry) -> None:
    metrics = PrometheusMetrics(registry)
    cache: CoalescingCache[str] = CoalescingCache(ttl=10, name="waits", metrics=metrics)
    metrics.watch(cache)
    coalesce_threads(cache)
    assert_prometheus_matches(registry, "waits", cache.stats())
    assert sample(registry, "stampede_coalesced_total", cache="waits") == 1
    assert sample(registry, "stampede_wait_duration_seconds_count", cache="waits") == 1
    assert sample(registry, "stampede_wait_duration_seconds_sum", cache="waits") >= 0


def test_prometheus_async_cache(registry: CollectorRegistry) -> None:
    metrics = PrometheusMetrics(registry)
    cache: AsyncCoalescingCache[str] = AsyncCoalescingCache(ttl=10, name="a", metrics=metrics)
    metrics.watch(cache)
    asyncio.run(drive_async(cache))
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.loads, stats.coalesced) == (1, 3, 2, 1)
    assert_prometheus_matches(registry, "a", stats)


def test_prometheus_exposition_parses(registry: CollectorRegistry) -> None:
    clock = FakeClock()
    metrics = PrometheusMetrics(registry)
    cache = metrics.watch(sync_cache(metrics, clock))
    drive_sync(cache, clock)
    families = {
        f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())
    }
    for event in (*COUNTED, "hits", "near_hits"):
        assert families[f"stampede_{event}"].type == "counter", event
        assert families[f"stampede_{event}"].documentation
    assert families["stampede_load_duration_seconds"].type == "histogram"
    assert families["stampede_wait_duration_seconds"].type == "histogram"
    hits = [s for s in families["stampede_hits"].samples if s.name == "stampede_hits_total"]
    assert [(s.labels, s.value) for s in hits] == [({"cache": "users"}, 1.0)]
    # Only the cache label (and the outcome of a load) on any series.
    labels = {k for f in families.values() for s in f.samples for k in s.labels}
    assert labels == {"cache", "outcome", "le"}


def test_prometheus_shows_a_watched_cache_before_its_first_hit(registry: CollectorRegistry) -> None:
    metrics = PrometheusMetrics(registry)
    cold: CoalescingCache[int] = metrics.watch(CoalescingCache(name="cold", metrics=metrics))
    assert registry.get_sample_value("stampede_hits_total", {"cache": "cold"}) == 0
    assert registry.get_sample_value("stampede_near_hits_total", {"cache": "cold"}) == 0
    cold.get_or_load("k", lambda: 1)
    cold.get_or_load("k", lambda: 1)
    assert sample(registry, "stampede_hits_total", cache="cold") == 1


def test_prometheus_watches_cached_functions(registry: CollectorRegistry) -> None:
    metrics = PrometheusMetrics(registry)

    @cached(ttl=10, metrics=metrics)
    def double(x: int) -> int:
        return 2 * x

    @cached(ttl=10, metrics=metrics)
    async def triple(x: int) -> int:
        return 3 * x

    assert metrics.watch(double) is double
    assert metrics.watch(triple) is triple
    assert double(2) == double(2) == 4

    async def twice() -> None:
        assert await triple(1) == await triple(1) == 3

    asyncio.run(twice())
    here = f"{__name__}.test_prometheus_watches_cached_functions.<locals>"
    for cache, name in ((double.cache, f"{here}.double"), (triple.cache, f"{here}.triple")):
        assert cache.name == name  # @cached names its cache after the function
        assert_prometheus_matches(registry, name, cache.stats())
        assert sample(registry, "stampede_hits_total", cache=name) == 1
    with pytest.raises(TypeError, match="@cached function"):
        metrics.watch(object())  # type: ignore[type-var]


def test_prometheus_watch_sums_names_and_counts_a_cache_once(registry: CollectorRegistry) -> None:
    metrics = PrometheusMetrics(registry)
    one: CoalescingCache[int] = CoalescingCache(name="same")
    two: CoalescingCache[int] = CoalescingCache(name="same")
    for cache in (one, two, one):
        metrics.watch(cache)
    for cache in (one, two, two):
        cache.get_or_load("k", lambda: 1)
        cache.get_or_load("k", lambda: 1)
    assert (one.stats().hits, two.stats().hits) == (1, 3)
    assert sample(registry, "stampede_hits_total", cache="same") == 4


def test_prometheus_collected_cache_keeps_its_hits(registry: CollectorRegistry) -> None:
    """A cache garbage-collected is no longer read, but the hits it counted stay in
    ``stampede_hits_total`` (a counter never goes back), those since the last scrape
    included."""
    metrics = PrometheusMetrics(registry)
    kept: CoalescingCache[int] = metrics.watch(CoalescingCache(name="kept"))
    gone: CoalescingCache[int] = metrics.watch(CoalescingCache(name="gone", metrics=metrics))
    for cache in (kept, gone):
        cache.get_or_load("k", lambda: 1)
        cache.get_or_load("k", lambda: 1)
    assert sample(registry, "stampede_hits_total", cache="gone") == 1
    gone.get_or_load("k", lambda: 1)  # a hit after the scrape, before the cache goes
    ref = weakref.ref(gone)
    del cache, gone
    gc.collect()
    assert ref() is None, "watch() must not keep a cache alive"
    assert sample(registry, "stampede_hits_total", cache="gone") == 2
    assert len(metrics._sink.watched._caches) == 1  # read one last time, then forgotten
    assert sample(registry, "stampede_hits_total", cache="kept") == 1
    assert sample(registry, "stampede_misses_total", cache="gone") == 1  # events stay counted
    generate_latest(registry)


def test_prometheus_record_never_raises(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = PrometheusMetrics(registry)
    metrics.record("c", "no_such_event", 1.0)  # not a Stats counter: ignored
    metrics.record("c", "hits")  # hits come from watch(), never from the hook
    metrics.record("c", "loads")  # no duration: counted, not timed
    metrics.record("c", "load_errors", -1.0)  # a clock going back: clamped to 0
    metrics.record("c", "fenced", 2.0)  # a duration on an untimed event: ignored
    assert sample(registry, "stampede_loads_total", cache="c") == 1
    assert sample(registry, "stampede_load_duration_seconds_count", cache="c", outcome="ok") == 0
    assert sample(registry, "stampede_load_duration_seconds_sum", cache="c", outcome="error") == 0
    assert sample(registry, "stampede_fenced_total", cache="c") == 1
    assert registry.get_sample_value("stampede_hits_total", {"cache": "c"}) is None
    names = {m.name for m in registry.collect()}
    assert not any("no_such_event" in n for n in names)

    def broken(*args: object) -> None:
        raise RuntimeError("metrics backend down")

    monkeypatch.setattr(metrics._sink, "record", broken)
    with caplog.at_level(logging.WARNING, logger="stampede.metrics"):
        metrics.record("c", "misses")
    assert "record('c', 'misses') failed" in caplog.text


def test_prometheus_instances_share_a_registry(registry: CollectorRegistry) -> None:
    first = PrometheusMetrics(registry)
    second = PrometheusMetrics(registry)  # say, a library's and the application's
    a: CoalescingCache[int] = first.watch(CoalescingCache(name="a", metrics=first))
    b: CoalescingCache[int] = second.watch(CoalescingCache(name="b", metrics=second))
    for cache in (a, b, a):
        cache.get_or_load("k", lambda: 1)
    assert sample(registry, "stampede_hits_total", cache="a") == 1
    assert sample(registry, "stampede_misses_total", cache="b") == 1
    families = list(text_string_to_metric_families(generate_latest(registry).decode()))
    series = [(s.name, tuple(sorted(s.labels.items()))) for f in families for s in f.samples]
    assert len(series) == len(set(series))  # one set of metrics, not two
    with pytest.raises(ValueError, match="other buckets"):
        PrometheusMetrics(registry, load_buckets=(0.1, 1.0))
    other = PrometheusMetrics(registry, prefix="app_cache")
    other.record("a", "misses")
    assert sample(registry, "app_cache_misses_total", cache="a") == 1
    assert sample(registry, "stampede_misses_total", cache="a") == 1


def test_prometheus_refuses_names_taken_by_another_collector(registry: CollectorRegistry) -> None:
    prometheus_client.Counter("stampede_loads", "someone else's", registry=registry)
    with pytest.raises(ValueError, match="prefix"):
        PrometheusMetrics(registry)
    assert [m.name for m in registry.collect()] == ["stampede_loads"]  # nothing half-registered
    PrometheusMetrics(registry, prefix="stampede_cache").record("x", "loads", 0.1)
    assert sample(registry, "stampede_cache_loads_total", cache="x") == 1


def test_prometheus_defaults_to_the_global_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    fresh = CollectorRegistry()
    monkeypatch.setattr(prometheus_client, "REGISTRY", fresh)
    metrics = PrometheusMetrics()
    assert metrics.registry is fresh and metrics.prefix == "stampede"
    metrics.record("x", "misses")
    assert sample(fresh, "stampede_misses_total", cache="x") == 1


def test_prometheus_checks_its_arguments(registry: CollectorRegistry) -> None:
    with pytest.raises(ValueError, match="prefix"):
        PrometheusMetrics(registry, prefix="not a name")
    with pytest.raises(ValueError):
        PrometheusMetrics(registry, wait_buckets=(2.0, 1.0))
    with pytest.raises(TypeError):
        PrometheusMetrics(registry, prefix=None)  # type: ignore[arg-type]


# -- OpenTelemetry -----------------------------------------------------------------


class Otel:
    """A MeterProvider with an in-memory reader, and its points by name and attributes."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])
        self.units: dict[str, str] = {}

    def collect(self) -> dict[str, dict[frozenset[tuple[str, Any]], Any]]:
        data = self.reader.get_metrics_data()
        found: dict[str, dict[frozenset[tuple[str, Any]], Any]] = {}
        if data is None:
            return found
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    points = found.setdefault(metric.name, {})
                    for point in metric.data.data_points:
                        points[frozenset((point.attributes or {}).items())] = point
                    self.units[metric.name] = metric.unit or ""
        return found


@pytest.fixture
def otel() -> Iterator[Otel]:
    o = Otel()
    yield o
    o.provider.shutdown()


def attrs(**labels: str) -> frozenset[tuple[str, Any]]:
    return frozenset(labels.items())


def value(
    points: dict[str, dict[frozenset[tuple[str, Any]], Any]], name: str, **labels: str
) -> Any:
    point = points.get(name, {}).get(attrs(**labels))
    return 0 if point is None else point.value


def count(
    points: dict[str, dict[frozenset[tuple[str, Any]], Any]], name: str, **labels: str
) -> Any:
    point = points.get(name, {}).get(attrs(**labels))
    return 0 if point is None else point.count


def assert_otel_matches(otel: Otel, cache: str, stats: Stats) -> dict[str, Any]:
    points = otel.collect()
    for event in COUNTED:
        assert value(points, f"stampede.{event}", cache=cache) == getattr(stats, event), event
    assert value(points, "stampede.hits", cache=cache) == stats.hits
    assert count(points, "stampede.load.duration", cache=cache, outcome="ok") == stats.loads
    errors = count(points, "stampede.load.duration", cache=cache, outcome="error")
    assert errors == stats.load_errors
    assert count(points, "stampede.wait.duration", cache=cache) == stats.coalesced
    return points


def test_otel_counters_match_stats(otel: Otel) -> None:
    clock = FakeClock()
    metrics = OpenTelemetryMetrics(meter_provider=otel.provider)
    cache = metrics.watch(sync_cache(metrics, clock))
    drive_sync(cache, clock)
    stats = cache.stats()
    assert (stats.loads, stats.load_errors, stats.negative_hits, stats.stale_served) == (2, 1, 1, 1)
    points = assert_otel_matches(otel, "users", stats)
    load = points["stampede.load.duration"]
    total = sum(p.sum for p in load.values())
    assert total == pytest.approx(stats.load_time) == pytest.approx(1.25)
    ok = load[attrs(cache="users", outcome="ok")]
    assert tuple(ok.explicit_bounds) == OTEL_BUCKETS  # the advised bounds, in seconds
    assert otel.units["stampede.load.duration"] == "s"


def test_otel_times_coalesced_waits(otel: Otel) -> None:
    metrics = OpenTelemetryMetrics(meter_provider=otel.provider)
    cache: CoalescingCache[str] = CoalescingCache(ttl=10, name="waits", metrics=metrics)
    metrics.watch(cache)
    coalesce_threads(cache)
    points = assert_otel_matches(otel, "waits", cache.stats())
    wait = points["stampede.wait.duration"][attrs(cache="waits")]
    assert wait.count == 1 and wait.sum >= 0
    assert otel.units["stampede.wait.duration"] == "s"


def test_otel_async_cache_and_cached_function(otel: Otel) -> None:
    metrics = OpenTelemetryMetrics(meter_provider=otel.provider)
    cache: AsyncCoalescingCache[str] = AsyncCoalescingCache(ttl=10, name="a", metrics=metrics)
    metrics.watch(cache)

    @cached(ttl=10, metrics=metrics)
    async def triple(x: int) -> int:
        return 3 * x

    assert metrics.watch(triple) is triple

    async def run() -> None:
        await drive_async(cache)
        assert await triple(1) == await triple(1) == 3

    asyncio.run(run())
    assert_otel_matches(otel, "a", cache.stats())
    assert_otel_matches(otel, triple.cache.name, triple.cache.stats())


def test_otel_collected_cache_is_no_longer_observed(otel: Otel) -> None:
    metrics = OpenTelemetryMetrics(meter_provider=otel.provider)
    kept: CoalescingCache[int] = metrics.watch(CoalescingCache(name="kept"))
    gone: CoalescingCache[int] = metrics.watch(CoalescingCache(name="gone", metrics=metrics))
    for cache in (kept, gone):
        cache.get_or_load("k", lambda: 1)
        cache.get_or_load("k", lambda: 1)
    ref = weakref.ref(gone)
    del cache, gone
    gc.collect()
    assert ref() is None, "watch() must not keep a cache alive"
    points = otel.collect()
    assert set(points["stampede.hits"]) == {attrs(cache="kept")}
    assert value(points, "stampede.hits", cache="kept") == 1
    assert value(points, "stampede.misses", cache="gone") == 1


def test_otel_instances_share_a_meter(otel: Otel) -> None:
    first = OpenTelemetryMetrics(meter_provider=otel.provider)
    second = OpenTelemetryMetrics(meter_provider=otel.provider)
    a: CoalescingCache[int] = first.watch(CoalescingCache(name="a", metrics=first))
    b: CoalescingCache[int] = second.watch(CoalescingCache(name="b", metrics=second))
    for cache in (a, b, a, b):
        cache.get_or_load("k", lambda: 1)
    points = otel.collect()
    # Both watch lists are read, though the SDK keeps one callback per name.
    assert (
        value(points, "stampede.hits", cache="a") == value(points, "stampede.hits", cache="b") == 1
    )
    assert value(points, "stampede.misses", cache="b") == 1
    own = OpenTelemetryMetrics(otel.provider.get_meter("mine"), prefix="mine")
    own.record("a", "loads", 0.5)
    points = otel.collect()
    assert value(points, "mine.loads", cache="a") == 1
    assert count(points, "mine.load.duration", cache="a", outcome="ok") == 1


def test_otel_record_never_raises(
    otel: Otel, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = OpenTelemetryMetrics(meter_provider=otel.provider)
    metrics.record("c", "no_such_event", 1.0)
    metrics.record("c", "hits")
    metrics.record("c", "loads")
    metrics.record("c", "coalesced", -1.0)
    points = otel.collect()
    assert value(points, "stampede.loads", cache="c") == 1
    assert count(points, "stampede.load.duration", cache="c", outcome="ok") == 0
    assert points["stampede.wait.duration"][attrs(cache="c")].sum == 0
    assert "stampede.hits" not in points or not points["stampede.hits"]
    assert not any("no_such_event" in name for name in points)

    def broken(*args: object) -> None:
        raise RuntimeError("collector down")

    monkeypatch.setattr(metrics._sink, "record", broken)
    with caplog.at_level(logging.WARNING, logger="stampede.metrics"):
        metrics.record("c", "misses")
    assert "record('c', 'misses') failed" in caplog.text
    with pytest.raises(TypeError, match="not both"):
        OpenTelemetryMetrics(otel.provider.get_meter("x"), meter_provider=otel.provider)
    with pytest.raises(ValueError, match="prefix"):
        OpenTelemetryMetrics(meter_provider=otel.provider, prefix="9 lives")


def test_otel_global_provider_default() -> None:
    # No SDK provider is set in this process: the proxy meter drops everything.
    metrics = OpenTelemetryMetrics()
    again = OpenTelemetryMetrics()
    assert metrics._sink is again._sink
    metrics.record("x", "loads", 0.1)
    cache: CoalescingCache[int] = metrics.watch(CoalescingCache(name="x", metrics=metrics))
    assert cache.get_or_load("k", lambda: 1) == 1


# -- both --------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_breaker_transitions_reach_both_adapters(
    fresh_redis_server: RedisServer, registry: CollectorRegistry, otel: Otel
) -> None:
    """A Redis killed, then restarted: each store's breaker opens and closes once,
    counted by the cache whose call did it, and exported (Prometheus by a sync cache,
    OpenTelemetry by an async one: both store paths)."""
    server = fresh_redis_server
    timeouts: dict[str, Any] = {"socket_timeout": 0.5, "socket_connect_timeout": 0.5}
    sync_store = RedisBackend(
        redis.Redis.from_url(server.url, retry=None, **timeouts), failure_threshold=1, cooldown=0
    )
    prom = PrometheusMetrics(registry)
    users: CoalescingCache[str] = prom.watch(
        CoalescingCache(sync_store, ttl=60, name="users", metrics=prom)
    )
    otel_metrics = OpenTelemetryMetrics(meter_provider=otel.provider)

    async def run() -> AsyncCoalescingCache[str]:
        client = redis.asyncio.Redis.from_url(server.url, retry=None, **timeouts)
        async_store = AsyncRedisBackend(client, failure_threshold=1, cooldown=0)
        rates: AsyncCoalescingCache[str] = otel_metrics.watch(
            AsyncCoalescingCache(async_store, ttl=60, name="rates", metrics=otel_metrics)
        )
        try:
            server.kill()
            assert users.get_or_load("k", lambda: "v") == "v"
            assert await rates.get_or_load("k", lambda: "w") == "w"
            assert sync_store.breaker.is_open and async_store.breaker.is_open
            server.restart()

            def closed() -> bool:
                users.get_or_load("k", lambda: "v")
                return not sync_store.breaker.is_open

            wait_until(closed, deadline=20, what="the sync store's breaker to close")
            for _ in range(200):  # the first commands may meet the pool's dead connections
                await rates.get_or_load("k", lambda: "w")
                if not async_store.breaker.is_open:
                    break
            assert not async_store.breaker.is_open
        finally:
            await client.aclose()
        return rates

    rates = asyncio.run(run())
    for cache in (users, rates):
        stats = cache.stats()
        assert (stats.breaker_opened, stats.breaker_closed) == (1, 1), cache.name
    assert_prometheus_matches(registry, "users", users.stats())
    points = assert_otel_matches(otel, "rates", rates.stats())
    assert value(points, "stampede.breaker_opened", cache="rates") == 1
    assert sample(registry, "stampede_breaker_closed_total", cache="users") == 1


def test_a_dropped_registry_or_meter_is_forgotten() -> None:
    registry = CollectorRegistry()
    PrometheusMetrics(registry)
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    OpenTelemetryMetrics(meter_provider=provider)
    meter = provider.get_meter(SCOPE, stampede.__version__)  # the one the hook took
    registries, meters = weakref.ref(registry), weakref.ref(meter)
    provider.shutdown()
    del registry, provider, meter
    gc.collect()
    assert registries() is None and meters() is None  # the shared state holds neither


def test_every_stats_counter_is_exported() -> None:
    from stampede._idem import COUNTERS

    idempotency = {f"idempotency_{name}" for name in COUNTERS}
    assert set(_common.EVENTS) | {"hits", "near_hits"} == set(_FIELDS) | idempotency
    assert set(_common._HELP) == set(_FIELDS) | idempotency
    assert set(_common.LOAD_OUTCOMES) | _common.WAITS <= set(_common.EVENTS)


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )


def test_importing_stampede_metrics_imports_neither_library() -> None:
    done = _run(
        "import sys, stampede, stampede.metrics\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('prometheus_client', 'opentelemetry')]\n"
        "assert not heavy, heavy\n"
        "from stampede.metrics import PrometheusMetrics, OpenTelemetryMetrics\n"
        "assert 'prometheus_client' in sys.modules and 'opentelemetry' in sys.modules\n"
        "try:\n"
        "    stampede.metrics.Nope\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("module", "library", "extra"),
    [
        ("prometheus", "prometheus_client", "prometheus"),
        ("opentelemetry", "opentelemetry", "opentelemetry"),
    ],
)
def test_a_missing_library_names_the_extra(module: str, library: str, extra: str) -> None:
    done = _run(f"import sys; sys.modules[{library!r}] = None\nimport stampede.metrics.{module}\n")
    assert done.returncode != 0
    assert f"pip install 'stampede[{extra}]'" in done.stderr


def test_an_idempotencys_counters_are_exported_by_its_namespace() -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry=registry)
    idem = stampede.Idempotency(metrics=metrics, namespace="payments")
    idem.do("order-1", lambda: 1)
    idem.do("order-1", lambda: 1)
    labels = {"cache": "payments"}
    assert registry.get_sample_value("stampede_idempotency_executed_total", labels) == 1
    assert registry.get_sample_value("stampede_idempotency_replayed_total", labels) == 1
