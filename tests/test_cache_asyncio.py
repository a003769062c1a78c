"""AsyncCoalescingCache under real event loops: coalescing, cancellation, fencing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from stampede import AsyncCoalescingCache, LoadAbandoned, LoadTimeout, RecursiveLoad
from stampede.testing import AsyncGate, Draws, FakeClock, async_wait_until

T = TypeVar("T")


def run(coro_fn: Callable[[], Awaitable[T]], deadline: float = 20.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro_fn(), deadline)

    return asyncio.run(bounded())


def coalesced(cache: AsyncCoalescingCache[Any]) -> int:
    return cache.stats().coalesced


@pytest.mark.parametrize("trial", range(3))
def test_cold_key_ten_thousand_tasks_one_load(trial: int) -> None:
    async def main() -> None:
        cache: AsyncCoalescingCache[object] = AsyncCoalescingCache(ttl=60)
        value = object()
        gate = AsyncGate(value)
        tasks = [asyncio.ensure_future(cache.get_or_load("k", gate)) for _ in range(10_000)]
        await async_wait_until(lambda: coalesced(cache) == 9_999)
        gate.open()
        results = await asyncio.gather(*tasks)
        assert gate.calls == 1
        assert all(r is value for r in results)
        assert len(cache._flight) == 0
        assert await cache.get_or_load("k", gate) is value

    run(main)


def test_first_caller_cancelled_value_still_loaded_and_stored() -> None:
    async def main() -> None:
        cache: AsyncCoalescingCache[str] = AsyncCoalescingCache(ttl=60)
        gate = AsyncGate("v")
        first = asyncio.ensure_future(cache.get_or_load("k", gate))
        await gate.entered.wait()
        others = [asyncio.ensure_future(cache.get_or_load("k", gate)) for _ in range(3)]
        await async_wait_until(lambda: coalesced(cache) == 3)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        gate.open()
        assert await asyncio.gather(*others) == ["v"] * 3
        assert gate.calls == 1 and gate.cancelled == 0
        assert await cache.get("k") == "v"

    run(main)


def test_every_caller_leaves_the_load_is_still_stored() -> None:
    async def main() -> None:
        cache: AsyncCoalescingCache[str] = AsyncCoalescingCache(ttl=60)
        gate = AsyncGate("v")
        tasks = [asyncio.ensure_future(cache.get_or_load("k", gate)) for _ in range(3)]
        await gate.entered.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        gate.open()
        await async_wait_until(lambda: len(cache._flight) == 0)
        assert await cache.get("k") == "v"
        assert await cache.get_or_load("k", gate) == "v" and gate.calls == 1

    run(main)


def test_one_waiter_cancelled_only_it_fails() -> None:
    async def main() -> None:
        cache: AsyncCoalescingCache[str] = AsyncCoalescingCache(ttl=60)
        gate = AsyncGate("v")
        tasks = [asyncio.ensure_future(cache.get_or_load("k", gate)) for _ in range(4)]
        await async_wait_until(lambda: coalesced(cache) == 3)
        tasks[1].cancel()
        gate.open()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[1], asyncio.CancelledError)
        assert [r for i, r in enumerate(results) if i != 1] == ["v"] * 3

    run(main)


def test_loader_forms_sync_async_and_awaitable_returning() -> None:
    async def main() -> None:
        cache: AsyncCoalescingCache[int] = AsyncCoalescingCache(ttl=60)

        async def fetch(n: int) -> int:
            await asyncio.sleep(0)
            return n

        assert await cache.get_or_load("sync", lambda: 1) == 1
        assert await cache.get_or_load("coro-fn", lambda: fetch(2)) == 2

        async def coro_fn() -> int:
            return 3

        assert await cache.get_or_load("async-def", coro_fn) == 3

    run(main)


def test_invalidate_during_load_fences_the_result() -> None:
    async def main() -> None:
        cache: AsyncCoalescingCache[str] = AsyncCoalescingCache(ttl=60)
        gate = AsyncGate("old")
        caller = asyncio.ensure_future(cache.get_or_load("k", gate))
        await gate.entered.wait()
        await cache.invalidate("k")
        assert await cache.get_or_load("k", lambda: "new") == "new"
        gate.open()
        assert await caller == "old"
        assert await cache.get("k") == "new"
        assert cache.stats().fenced == 1

    run(main)


def test_error_shared_then_retried() -> None:
    async def main() -> None:
        cache: AsyncCoalescingCache[str] = AsyncCoalescingCache(ttl=60)
        boom = ValueError("boom")
        gate = AsyncGate(error=boom)
        tasks = [asyncio.ensure_future(cache.get_or_load("k", gate)) for _ in range(10)]
        await async_wait_until(lambda: coalesced(cache) == 9)
        gate.open()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(r is boom for r in results) and gate.calls == 1
        assert await cache.get_or_load("k", lambda: "ok") == "ok"

    run(main)


def test_load_task_cancelled_gives_load_abandoned_and_caches_nothing() -> None:
    async def main() -> None:
        cache: AsyncCoalescingCache[str] = AsyncCoalescingCache(
            ttl=60, cache_errors=(BaseException,)
        )
        gate = AsyncGate("v")
        tasks = [asyncio.ensure_future(cache.get_or_load("k", gate)) for _ in range(3)]
        await async_wait_until(lambda: coalesced(cache) == 2)
        (calls,) = cache._flight._maps.values()
        calls["k"].task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, LoadAbandoned) for r in results)
        assert await cache.get_or_load("k", lambda: "ok") == "ok"

    run(main)


@pytest.mark.parametrize("how", ["same task", "child task"])
def test_recursive_get_or_load_raises(how: str) -> None:
    async def main() -> None:
        cache: AsyncCoalescingCache[int] = AsyncCoalescingCache(ttl=60)

        async def loader() -> int:
            again = cache.get_or_load("k", loader)
            with pytest.raises(RecursiveLoad):
                if how == "same task":
                    await again
                else:
                    await asyncio.ensure_future(again)
            return 1

        assert await cache.get_or_load("k", loader) == 1

    run(main)


def test_wait_timeout_bounds_every_caller_and_starts_no_load() -> None:
    async def main() -> None:
        cache: AsyncCoalescingCache[str] = AsyncCoalescingCache(ttl=60, wait_timeout=0.05)
        gate = AsyncGate("v")
        with pytest.raises(LoadTimeout):
            await cache.get_or_load("k", gate)  # the first caller's wait is bounded too
        with pytest.raises(LoadTimeout):
            await cache.get_or_load("k", gate)
        assert gate.calls == 1
        gate.open()
        await async_wait_until(lambda: len(cache._flight) == 0)
        assert await cache.get("k") == "v"  # the load went on and was stored

    run(main)


def test_early_refresh_once_readers_keep_value() -> None:
    async def main() -> None:
        clock = FakeClock()
        cache: AsyncCoalescingCache[str] = AsyncCoalescingCache(
            ttl=10, beta=1.0, clock=clock, random=Draws(then=0.99)
        )

        def first() -> str:
            clock.advance(0.5)
            return "old"

        await cache.get_or_load("k", first)
        clock.advance(9.9)
        refresh = AsyncGate("new")
        results = await asyncio.gather(*(cache.get_or_load("k", refresh) for _ in range(50)))
        assert results == ["old"] * 50
        await refresh.entered.wait()
        assert refresh.calls == 1 and cache.stats().early_refreshes == 1
        refresh.open()
        await async_wait_until(lambda: len(cache._flight) == 0)
        assert await cache.get_or_load("k", refresh) == "new"

    run(main)


def test_one_cache_used_from_several_event_loops() -> None:
    cache: AsyncCoalescingCache[int] = AsyncCoalescingCache(ttl=60)

    async def load(key: str, n: int) -> int:
        return await cache.get_or_load(key, lambda: n)

    assert asyncio.run(load("a", 1)) == 1
    assert asyncio.run(load("a", 2)) == 1  # a hit, from another loop
    assert asyncio.run(load("b", 3)) == 3
    assert cache._flight._maps == {}
