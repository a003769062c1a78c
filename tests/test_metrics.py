"""stats() counters and the metrics hook."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from stampede import AsyncCoalescingCache, CoalescingCache, LoggingMetrics, Stats
from stampede.testing import FakeClock, Gate, wait_until

from .helpers import join_all


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, float | None]] = []
        self._lock = threading.Lock()

    def record(self, cache: str, event: str, duration: float | None = None) -> None:
        with self._lock:
            self.events.append((cache, event, duration))

    def names(self) -> list[str]:
        return [e for _, e, _ in self.events]


def test_stats_snapshot_is_frozen_and_counts() -> None:
    clock = FakeClock()
    cache: CoalescingCache[str] = CoalescingCache(
        ttl=1, stale_ttl=5, beta=0, cache_errors=(KeyError,), error_ttl=1, clock=clock
    )

    def slow() -> str:
        clock.advance(0.25)
        return "v"

    cache.get_or_load("k", slow)
    cache.get_or_load("k", slow)
    snapshot = cache.stats()
    with pytest.raises(AttributeError):
        snapshot.hits = 5  # type: ignore[misc]

    def missing() -> str:
        raise KeyError("x")

    with pytest.raises(KeyError):
        cache.get_or_load("gone", missing)
    with pytest.raises(KeyError):
        cache.get_or_load("gone", missing)
    clock.advance(2)
    assert cache.get_or_load("k", slow) == "v"  # stale, refreshing
    wait_until(lambda: len(cache._flight) == 0)
    s = cache.stats()
    assert isinstance(s, Stats)
    assert (s.hits, s.misses, s.loads, s.load_errors) == (1, 2, 2, 1)
    assert (s.negative_hits, s.stale_served) == (1, 1)
    assert s.load_time == pytest.approx(0.5)
    assert s.hit_ratio == pytest.approx(3 / 5)
    assert snapshot.hits == 1  # the old snapshot did not move


def test_hook_receives_slow_path_events_with_durations() -> None:
    clock = FakeClock()
    rec = Recorder()
    cache: CoalescingCache[str] = CoalescingCache(
        ttl=10, name="prices", metrics=rec, clock=clock, cache_errors=(KeyError,)
    )

    def load() -> str:
        clock.advance(0.5)
        return "v"

    cache.get_or_load("k", load)
    cache.get_or_load("k", load)  # a hit: no event, read hits from stats()

    def fail() -> str:
        clock.advance(0.25)
        raise KeyError("k")

    with pytest.raises(KeyError):
        cache.get_or_load("bad", fail)
    with pytest.raises(KeyError):
        cache.get_or_load("bad", fail)
    assert rec.events == [
        ("prices", "misses", None),
        ("prices", "loads", 0.5),
        ("prices", "misses", None),
        ("prices", "load_errors", 0.25),
        ("prices", "negative_hits", None),
    ]


def test_hook_times_coalesced_waits() -> None:
    rec = Recorder()
    cache: CoalescingCache[str] = CoalescingCache(ttl=10, metrics=rec)
    gate = Gate("v")
    leader = threading.Thread(target=cache.get_or_load, args=("k", gate))
    leader.start()
    gate.entered.wait(5)
    waiter = threading.Thread(target=cache.get_or_load, args=("k", gate))
    waiter.start()
    wait_until(lambda: cache.stats().coalesced == 1)
    gate.open()
    join_all([leader, waiter])
    waits = [d for _, e, d in rec.events if e == "coalesced"]
    assert len(waits) == 1 and waits[0] is not None and waits[0] >= 0


def test_async_hook_and_cache_name_defaults() -> None:
    rec = Recorder()
    cache: AsyncCoalescingCache[int] = AsyncCoalescingCache(namespace="users", metrics=rec)
    assert cache.name == "users"
    assert asyncio.run(cache.get_or_load("k", lambda: 1)) == 1
    assert rec.names() == ["misses", "loads"]
    assert CoalescingCache().name == "default"


def test_a_failing_hook_never_breaks_a_call(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def record(self, cache: str, event: str, duration: float | None = None) -> None:
            raise RuntimeError("metrics backend down")

    cache: CoalescingCache[int] = CoalescingCache(metrics=Broken())
    with caplog.at_level(logging.WARNING, logger="stampede"):
        assert cache.get_or_load("k", lambda: 1) == 1
    assert "metrics hook failed" in caplog.text


def test_a_metrics_hook_may_call_the_cache() -> None:
    """No hook runs under the fencing lock: a hook that invalidates the very key
    being committed (so the same, non-reentrant stripe) does not deadlock.

    Regression test for 3a21f4a (Review fixes: store writes counted outside the
    fencing lock).
    """
    cache: CoalescingCache[str]

    class Hook:
        def record(self, name: str, event: str, duration: float | None = None) -> None:
            if event in ("fenced", "loads"):
                cache.invalidate("k")

    cache = CoalescingCache(metrics=Hook())
    gate = Gate("v")
    t = threading.Thread(target=cache.get_or_load, args=("k", gate))
    t.start()
    assert gate.entered.wait(5)
    cache.invalidate("k")
    gate.open()
    join_all([t])
    assert cache.stats().fenced == 1
    assert cache.get_or_load("k", lambda: "v2") == "v2"  # its "loads" event invalidated it too
    assert cache.get("k") is None


def test_logging_metrics(caplog: pytest.LogCaptureFixture) -> None:
    cache: CoalescingCache[int] = CoalescingCache(name="orders", metrics=LoggingMetrics())
    with caplog.at_level(logging.DEBUG, logger="stampede.metrics"):
        cache.get_or_load("k", lambda: 1)
    messages = [r.getMessage() for r in caplog.records if r.name == "stampede.metrics"]
    assert messages[0] == "orders misses"
    assert messages[1].startswith("orders loads ") and messages[1].endswith(" ms")


def test_decorated_function_names_its_cache() -> None:
    from stampede import cached

    rec = Recorder()

    @cached(metrics=rec)
    def lookup(x: int) -> int:
        return x

    lookup(1)
    assert {c for c, _, _ in rec.events} == {f"{__name__}.{lookup.__qualname__}"}


def test_refresh_joining_a_load_is_a_timed_coalesced_wait() -> None:
    rec = Recorder()
    cache: CoalescingCache[str] = CoalescingCache(ttl=10, metrics=rec)
    gate = Gate("v")
    leader = threading.Thread(target=cache.get_or_load, args=("k", gate))
    leader.start()
    gate.entered.wait(5)
    joiner = threading.Thread(target=cache.refresh, args=("k", gate))
    joiner.start()
    wait_until(lambda: cache.stats().coalesced == 1)
    gate.open()
    join_all([leader, joiner])
    waits = [d for _, e, d in rec.events if e == "coalesced"]
    assert len(waits) == 1 and waits[0] is not None and waits[0] >= 0


def test_async_refresh_joining_a_load_is_a_timed_coalesced_wait() -> None:
    async def main() -> None:
        rec = Recorder()
        cache: AsyncCoalescingCache[str] = AsyncCoalescingCache(ttl=10, metrics=rec)
        opened = asyncio.Event()

        async def load() -> str:
            await opened.wait()
            return "v"

        first = asyncio.create_task(cache.get_or_load("k", load))
        await asyncio.sleep(0)
        second = asyncio.create_task(cache.refresh("k", load))
        while cache.stats().coalesced < 1:
            await asyncio.sleep(0)
        opened.set()
        assert await asyncio.gather(first, second) == ["v", "v"]
        waits = [d for _, e, d in rec.events if e == "coalesced"]
        assert len(waits) == 1 and waits[0] is not None and waits[0] >= 0

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_lease_wait_is_timed_once_when_it_ends(redis_url: str) -> None:
    """A cache waiting on another one's lease (two caches stand for two processes)."""
    rec = Recorder()
    holder: CoalescingCache[str] = CoalescingCache(redis_url, ttl=60, distributed=True)
    waiter: CoalescingCache[str] = CoalescingCache(
        redis_url, ttl=60, distributed=True, metrics=rec, name="w"
    )
    gate = Gate("v")
    leader = threading.Thread(target=holder.get_or_load, args=("k", gate))
    leader.start()
    gate.entered.wait(5)
    result: list[str] = []
    follower = threading.Thread(target=lambda: result.append(waiter.get_or_load("k", gate)))
    follower.start()
    wait_until(lambda: waiter.stats().lease_waits == 1)
    assert "lease_waits" not in rec.names()  # heard of when the wait ends, with its length
    gate.open()
    join_all([leader, follower])
    assert result == ["v"] and gate.calls == 1
    waits = [(c, d) for c, e, d in rec.events if e == "lease_waits"]
    assert len(waits) == 1 and waits[0][0] == "w"
    assert waits[0][1] is not None and waits[0][1] >= 0
