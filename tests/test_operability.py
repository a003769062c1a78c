"""What an operator sees during trouble: breaker transitions logged and counted,
outage warnings collapsed, and a value that cannot be stored named with its fix.

Stores are real: a private Redis server killed and restarted, a disk folder, a
mapping that fails. Time for the warnings' intervals is the cache's injected
clock (``FakeClock``), never a sleep.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry

from stampede import CoalescingCache
from stampede._breaker import Breaker
from stampede._failures import OUTAGE_INTERVAL, UNSTORABLE_INTERVAL
from stampede.backends.disk import DiskBackend
from stampede.backends.redis import RedisBackend
from stampede.metrics.prometheus import PrometheusMetrics
from stampede.serializers import JsonSerializer, PickleSerializer
from stampede.testing import FakeClock, wait_until
from tests.support.redis_server import RedisServer

from .helpers import join_all


def lines(caplog: pytest.LogCaptureFixture, text: str, level: int = logging.WARNING) -> list[str]:
    """The messages at ``level`` of the ``stampede`` logger that contain ``text``."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "stampede" and r.levelno == level and text in r.getMessage()
    ]


def client_of(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(
        server.url, socket_timeout=0.5, socket_connect_timeout=0.5, retry=None
    )


def burst(n: int, call: Any) -> list[Any]:
    """``n`` threads released together, each making ``call()``; their results."""
    start = threading.Barrier(n)
    got: list[Any] = [None] * n

    def one(i: int) -> None:
        start.wait()
        got[i] = call()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    join_all(threads)
    return got


# -- the breaker -----------------------------------------------------------------------


def test_breaker_logs_each_transition_once(caplog: pytest.LogCaptureFixture) -> None:
    """Open: one WARNING naming the store, the failure and the cooldown, however many
    calls fail; failed probes are no new opening. Closed: one WARNING."""
    clock = FakeClock()
    breaker = Breaker(threshold=2, cooldown=5, clock=clock)
    cause = ConnectionError("refused")
    with caplog.at_level(logging.DEBUG, logger="stampede"):
        assert breaker.failure(cause, "the-store") is False  # 1 of 2: still closed
        assert breaker.failure(cause, "the-store") is True  # opens
        assert breaker.failure(cause, "the-store") is False  # sent before it opened
        assert not breaker.allow() and not breaker.allow()
        clock.advance(5)
        assert breaker.allow()  # the probe ...
        assert breaker.failure(cause, "the-store") is False  # ... fails: open again
        clock.advance(5)
        assert breaker.allow()
        clock.advance(1.5)
        assert breaker.success() is True  # the probe answers: closed
        assert breaker.success() is False
    [opened] = lines(caplog, "circuit open")
    assert "the-store failed 2 times in a row" in opened
    assert "ConnectionError: refused" in opened and "for 5 s" in opened
    [closed] = lines(caplog, "circuit closed")
    assert "the-store answers again" in closed
    assert "after 11.5 s open (2 operations refused)" in closed
    assert len(lines(caplog, "failed again", logging.DEBUG)) == 2


@pytest.mark.timeout(60)
def test_a_dead_redis_opens_the_breaker_once_and_the_caches_count_it(
    fresh_redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Two caches on one Redis store share its breaker. A burst on one of them while
    Redis is dead opens it: one WARNING, counted by that cache alone and exported
    as stampede_breaker_opened_total; the other cache's call that closes it once
    Redis is back counts the close."""
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    store = RedisBackend(client_of(fresh_redis_server), failure_threshold=3, cooldown=0)
    users: CoalescingCache[str] = CoalescingCache(store, ttl=60, name="users", metrics=metrics)
    rates: CoalescingCache[str] = CoalescingCache(store, ttl=60, name="rates", metrics=metrics)
    assert users.get_or_load("k", lambda: "v") == "v"
    fresh_redis_server.kill()
    with caplog.at_level(logging.DEBUG, logger="stampede"):
        assert burst(20, lambda: users.get_or_load("k", lambda: "origin")) == ["origin"] * 20
        assert store.breaker.is_open
        assert (users.stats().breaker_opened, rates.stats().breaker_opened) == (1, 0)
        fresh_redis_server.restart()

        def closed() -> bool:
            rates.get_or_load("other", lambda: "x")
            return not store.breaker.is_open

        wait_until(closed, deadline=20, what="a probe of the restarted Redis to succeed")
    [opened] = lines(caplog, "circuit open")
    port = fresh_redis_server.port
    assert opened.startswith(f"Redis at 127.0.0.1:{port}/0 failed 3 times in a row"), opened
    assert "ConnectionError" in opened and "for 0 s" in opened
    assert len(lines(caplog, "circuit closed")) == 1
    assert (users.stats().breaker_closed, rates.stats().breaker_closed) == (0, 1)

    def sample(name: str, cache: str) -> float | None:
        return registry.get_sample_value(name, {"cache": cache})

    assert sample("stampede_breaker_opened_total", "users") == 1
    assert sample("stampede_breaker_opened_total", "rates") is None
    assert sample("stampede_breaker_closed_total", "rates") == 1


# -- outage warnings ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_an_outage_burst_writes_one_warning_per_interval(
    fresh_redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """100 callers at once on a dead Redis (breaker out of the way): one 'store read
    failed' line instead of one per caller; the others go to DEBUG and are counted
    on the next line, once the interval has passed."""
    clock = FakeClock()
    store = RedisBackend(client_of(fresh_redis_server), failure_threshold=10_000)
    cache: CoalescingCache[str] = CoalescingCache(store, ttl=60, clock=clock)
    fresh_redis_server.kill()
    with caplog.at_level(logging.DEBUG, logger="stampede"):
        assert burst(100, lambda: cache.get_or_load("k", lambda: "origin")) == ["origin"] * 100
        [read] = lines(caplog, "store read failed")
        # every caller's read failed: all but the first held back
        assert len(lines(caplog, "store read failed", logging.DEBUG)) >= 99
        assert len(lines(caplog, "store write failed")) == 1
        clock.advance(OUTAGE_INTERVAL - 0.001)
        cache.get_or_load("k", lambda: "origin")  # still within the interval: quiet
        assert len(lines(caplog, "store read failed")) == 1
        held = len(lines(caplog, "store read failed", logging.DEBUG))
        clock.advance(0.001)
        caplog.clear()
        cache.get_or_load("k", lambda: "origin")
    [again] = lines(caplog, "store read failed")
    assert again.endswith(f"({held} more in the last 10 s)")
    assert "Redis failed:" in read and "more in the last" not in read
    assert cache.stats().backend_errors >= 100  # counted, every one


class FailingMapping(dict[Any, Any]):
    """A user's mapping whose storage has failed: every read and write raises."""

    def get(self, key: Any, default: Any = None) -> Any:
        raise OSError("the mapping's storage is gone")

    def __setitem__(self, key: Any, value: Any) -> None:
        raise OSError("the mapping's storage is gone")


def test_a_failing_mapping_warns_once_per_interval_per_store(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In-process stores too: one line per store and kind (read, write) per
    interval, with the traceback; each store has its own interval."""
    clock = FakeClock()
    one: CoalescingCache[int] = CoalescingCache(FailingMapping(), ttl=60, clock=clock)
    two: CoalescingCache[int] = CoalescingCache(FailingMapping(), ttl=60, clock=clock)
    with caplog.at_level(logging.DEBUG, logger="stampede"):
        for _ in range(20):
            assert one.get_or_load("k", lambda: 1) == 1
        held = len(lines(caplog, "treating it as a miss", logging.DEBUG))
        assert held >= 19
        assert two.get_or_load("k", lambda: 2) == 2
        reads = [r for r in caplog.records if r.levelno == logging.WARNING and "read" in r.msg]
        assert len(reads) == 2  # one per store
        assert all(r.exc_info and isinstance(r.exc_info[1], OSError) for r in reads)
        assert len(lines(caplog, "store write failed")) == 2
        clock.advance(OUTAGE_INTERVAL)
        caplog.clear()
        one.get_or_load("k", lambda: 1)
    [again] = lines(caplog, "treating it as a miss")
    assert re.search(rf"\({held} more in the last 10 s\)$", again), again
    assert one.stats().backend_errors >= 40


# -- values that cannot be stored --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Invoice:  # a dataclass: registrable, not registered
    number: int


class Opaque:  # a plain class: DataSerializer cannot store it at all
    pass


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[str]:
    yield f"disk://{tmp_path / 'cache'}"


def test_an_unregistered_class_warning_names_the_fix_once_per_interval(
    disk: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    cache: CoalescingCache[Invoice] = CoalescingCache(disk, ttl=60, name="invoices", clock=clock)
    with caplog.at_level(logging.WARNING, logger="stampede"):
        for n in range(5):
            assert cache.get_or_load(n, lambda n=n: Invoice(n)) == Invoice(n)
        [first] = lines(caplog, "cannot serialize")
        clock.advance(UNSTORABLE_INTERVAL)
        caplog.clear()
        cache.get_or_load("late", lambda: Invoice(9))
    [later] = lines(caplog, "cannot serialize")
    assert f"DataSerializer(types=[{__name__}.Invoice])" in first  # what to do ...
    assert "PickleSerializer(secret=...)" in first  # ... or else
    assert "cache 'invoices'" in first and "not cached" in first
    assert later.endswith("(4 more in the last 60 s)")
    assert cache.stats().serialization_errors == 6  # every one counted


def test_other_unstorable_values_name_a_fix_too(
    disk: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A class DataSerializer cannot take points to the signed pickle; a serializer
    whose reason names no fix gets the general one (JSON), or the pickle's own."""
    plain: CoalescingCache[Any] = CoalescingCache(disk, ttl=60, namespace="plain")
    as_json: CoalescingCache[Any] = CoalescingCache(
        disk, ttl=60, namespace="json", serializer=JsonSerializer()
    )
    pickled: CoalescingCache[Any] = CoalescingCache(
        disk, ttl=60, namespace="pickle", serializer=PickleSerializer(secret=b"k" * 32)
    )
    with caplog.at_level(logging.WARNING, logger="stampede"):
        plain.get_or_load("k", Opaque)
        as_json.get_or_load("k", lambda: {1, 2})
        pickled.get_or_load("k", lambda: threading.Lock())
    [opaque, json_set, lock] = lines(caplog, "not cached")
    assert f"{__name__}.Opaque" in opaque and "PickleSerializer(secret=...)" in opaque
    assert "serializer=" in json_set and "cache_if=" in json_set
    assert "return a picklable value" in lock and "PickleSerializer(" not in lock


def test_a_value_over_max_value_size_names_the_fix(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    store = DiskBackend(str(tmp_path / "c"), max_value_size=1000)
    cache: CoalescingCache[bytes] = CoalescingCache(store, ttl=60, clock=clock)
    with caplog.at_level(logging.WARNING, logger="stampede"):
        for n in range(3):
            cache.get_or_load(n, lambda: b"x" * 5000)
    [line] = lines(caplog, "more than max_value_size")
    assert "max_value_size=" in line.split("(cache")[1]
    assert cache.stats().serialization_errors == 3
