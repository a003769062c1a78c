"""Regressions for the bugs a review found (each failed before its fix)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import diskcache
import pytest
import redis
import redis.asyncio

from stampede import AsyncCoalescingCache, CoalescingCache
from stampede.testing import FakeClock, Gate, wait_until

# -- the decorator on shared stores -----------------------------------------------------


# -- keys ---------------------------------------------------------------------------------


# -- loads and their context ------------------------------------------------------------------


# -- stores ------------------------------------------------------------------------------------


def _store_for(kind: str, redis_url: str, tmp_path: Path) -> Any:
    return redis_url if kind == "redis" else f"disk://{tmp_path / 'shared'}"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["redis", "disk"])
def test_distributed_set_is_not_overwritten_by_a_load_committing_meanwhile(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """set() with distributed=True wrote the value, then broke the lease in a second
    step: a leader in another process committing in between overwrote the value
    just set. Now the write and the break are one atomic step. Two caches stand
    for two processes; the other leader's commit is let through at the worst moment."""
    url = request.getfixturevalue("redis_url") if kind == "redis" else ""
    where = _store_for(kind, url, tmp_path)
    a: CoalescingCache[str] = CoalescingCache(where, ttl=60, distributed=True)
    b: CoalescingCache[str] = CoalescingCache(where, ttl=60, distributed=True)
    gate = Gate("loaded-before-set")
    leader = threading.Thread(target=a.get_or_load, args=("k", gate))
    leader.start()
    assert gate.entered.wait(10)
    store: Any = b.backend
    original = store._lease_break_raw

    def break_after_the_other_commit(*args: Any) -> None:
        gate.open()
        leader.join(10)  # a's commit lands before b's lease break runs
        original(*args)

    store._lease_break_raw = break_after_the_other_commit
    b.set("k", "set-by-b")
    assert not leader.is_alive()
    assert b.get("k") == "set-by-b"
    assert a.get("k") == "set-by-b"


@pytest.mark.timeout(30)
def test_async_distributed_set_is_not_overwritten_by_a_load_committing_meanwhile(
    redis_url: str,
) -> None:
    async def main() -> None:
        a: AsyncCoalescingCache[str] = AsyncCoalescingCache(redis_url, ttl=60, distributed=True)
        b: AsyncCoalescingCache[str] = AsyncCoalescingCache(redis_url, ttl=60, distributed=True)
        opened = asyncio.Event()
        entered = asyncio.Event()

        async def load() -> str:
            entered.set()
            await opened.wait()
            return "loaded-before-set"

        leader = asyncio.create_task(a.get_or_load("k", load))
        await asyncio.wait_for(entered.wait(), 10)
        store: Any = b.backend
        original = store._alease_break_raw

        async def break_after_the_other_commit(*args: Any) -> None:
            opened.set()
            await asyncio.wait_for(leader, 10)
            await original(*args)

        store._alease_break_raw = break_after_the_other_commit
        await b.set("k", "set-by-b")
        assert await b.get("k") == "set-by-b"
        assert await a.get("k") == "set-by-b"

    asyncio.run(main())


@pytest.mark.timeout(20)
def test_first_lease_wait_ends_on_the_subscription_not_the_poll(redis_url: str) -> None:
    """A process's first lease wait began before its pub/sub subscription was
    confirmed: a commit in that window woke no one and the waiter slept out the
    poll interval. Now a wait before the subscription returns once subscribed
    (the caller looks again), and later waits end on the commit's message.
    The waits below get 60 s timeouts: without the fix they would hang the test."""
    from stampede.backends.redis import CHANNEL, RedisBackend

    store = RedisBackend(redis.Redis.from_url(redis_url))
    publisher = redis.Redis.from_url(redis_url)
    with store.lease_listen("k") as wake:
        wake.wait(60)  # returns when subscribed
    with store.lease_listen("k") as wake:
        publisher.publish(CHANNEL, "k")
        wake.wait(60)  # returns on the message
    publisher.close()


@pytest.mark.timeout(20)
def test_first_async_lease_wait_ends_on_the_subscription_not_the_poll(redis_url: str) -> None:
    from stampede.backends.redis import CHANNEL, AsyncRedisBackend

    async def main() -> None:
        store = AsyncRedisBackend(redis.asyncio.Redis.from_url(redis_url))
        publisher = redis.asyncio.Redis.from_url(redis_url)
        async with store.alease_listen("k") as wake:
            await wake.wait(60)
        async with store.alease_listen("k") as wake:
            await publisher.publish(CHANNEL, "k")
            await wake.wait(60)
        await publisher.aclose()
        await store.client.aclose()

    asyncio.run(main())


def test_distributed_on_a_fanout_cache_says_why_it_is_refused(tmp_path: Path) -> None:
    fanout = diskcache.FanoutCache(str(tmp_path / "fan"), shards=2)
    try:
        with pytest.raises(ValueError, match="FanoutCache"):
            CoalescingCache(fanout, distributed=True)
        with pytest.raises(ValueError, match="this process only"):
            CoalescingCache({}, distributed=True)
    finally:
        fanout.close()


@pytest.mark.timeout(30)
def test_a_refresh_run_by_another_process_is_not_retried_on_every_read(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """Past its refresh point, every read of a key in a process that does not hold
    the refresh lease tried the lease again (an extra EVALSHA per read) and counted
    an early refresh it did not run. Now a process that found the refresh running
    elsewhere leaves it alone for a moment, and only the refreshing process counts it."""
    clock = FakeClock()
    options: dict[str, Any] = dict(ttl=1, stale_ttl=30, distributed=True, clock=clock)
    a: CoalescingCache[str] = CoalescingCache(redis_url, **options)
    b: CoalescingCache[str] = CoalescingCache(redis_url, **options)

    def first() -> str:
        clock.advance(0.3)  # the load time XFetch scales by
        return "v1"

    assert a.get_or_load("k", first) == "v1"
    clock.advance(0.95)  # past any refresh point (>= half the ttl), before expiry
    gate = Gate("v2")
    assert a.get_or_load("k", gate) == "v1"  # starts a's background refresh
    assert gate.entered.wait(10)  # a holds the refresh lease

    def evalsha_calls() -> int:
        stats: Any = redis_client.info("commandstats")
        return int(stats["cmdstat_evalsha"]["calls"])

    before = evalsha_calls()
    never = Gate("never loaded by b")
    for _ in range(30):
        assert b.get_or_load("k", never) == "v1"
        wait_until(lambda: len(b._flight) == 0)  # b's refresh attempt, if any, is over
    assert evalsha_calls() - before <= 31  # 30 reads, one look at the lease
    assert never.calls == 0
    gate.open()
    wait_until(lambda: len(a._flight) == 0)
    assert (a.stats().early_refreshes, b.stats().early_refreshes) == (1, 0)
    assert b.get_or_load("k", never) == "v2"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["redis", "disk"])
@pytest.mark.parametrize("problem", ["too large", "not serializable"])
def test_distributed_value_that_cannot_be_stored_is_counted_and_frees_the_lease(
    kind: str, problem: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """With distributed=True, a value over max_value_size was dropped silently (not
    counted, not logged), and one the serializer refused left the lease held until
    it expired: the next process waited lease_ttl before loading."""
    from stampede.backends.disk import DiskBackend
    from stampede.backends.redis import RedisBackend

    url = request.getfixturevalue("redis_url") if kind == "redis" else ""
    folder = tmp_path / "shared"

    def store() -> Any:
        if kind == "redis":
            return RedisBackend(redis.Redis.from_url(url), max_value_size=1000)
        return DiskBackend(str(folder), max_value_size=1000)

    a: CoalescingCache[Any] = CoalescingCache(store(), ttl=60, distributed=True, lease_ttl=30)
    b: CoalescingCache[Any] = CoalescingCache(store(), ttl=60, distributed=True, lease_ttl=30)
    value: Any = "x" * 5000 if problem == "too large" else object()
    assert a.get_or_load("k", lambda: value) is value  # the callers still get it
    assert a.stats().serialization_errors == 1
    # The lease is free: b loads at once instead of waiting out lease_ttl (30 s,
    # past this test's timeout).
    assert b.get_or_load("k", lambda: "b's value") == "b's value"
    assert b.stats().lease_waits == 0


@pytest.mark.timeout(30)
def test_async_distributed_value_that_cannot_be_stored_frees_the_lease(redis_url: str) -> None:
    from stampede.backends.redis import AsyncRedisBackend

    async def main() -> None:
        def cache() -> AsyncCoalescingCache[Any]:
            store = AsyncRedisBackend(redis.asyncio.Redis.from_url(redis_url))
            return AsyncCoalescingCache(store, ttl=60, distributed=True, lease_ttl=30)

        a, b = cache(), cache()
        value = object()
        assert await a.get_or_load("k", lambda: value) is value
        assert a.stats().serialization_errors == 1
        assert await b.get_or_load("k", lambda: "b's value") == "b's value"
        assert b.stats().lease_waits == 0

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_lease_listener_thread_ends_with_its_client_and_at_exit(redis_url: str) -> None:
    """The sync pub/sub listener held its client for ever and never stopped: one
    thread per client for the life of the process, reconnecting every 0.5 s once
    the server was gone, and frozen at interpreter exit, maybe holding the pool's
    lock (a deadlock in the pool's finalizers, seen on Python 3.13). It now holds
    the client weakly, ends with it, and is stopped by an atexit hook."""
    import gc

    from stampede.backends import redis as redis_backend

    def listening_thread() -> tuple[threading.Thread, Any]:
        client = redis.Redis.from_url(redis_url)
        store = redis_backend.RedisBackend(client)
        with store.lease_listen("k") as wake:
            wake.wait(10)  # returns once subscribed
        notifier = redis_backend._notifier_for(client)
        assert notifier._thread.is_alive()
        return notifier._thread, client

    thread, client = listening_thread()
    del client
    gc.collect()
    thread.join(10)
    assert not thread.is_alive()

    thread, client = listening_thread()
    redis_backend._stop_listeners()  # what the atexit hook runs
    assert not thread.is_alive()
    client.close()
