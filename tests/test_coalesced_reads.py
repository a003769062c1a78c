"""Coalesced reads: concurrent reads of one key in one process share one round trip.

Against the private Redis server (tests/redis_fixtures.py). A read is held in
flight either by stopping the server (SIGSTOP: the request is sent, the reply
waits) or by a gate in front of a real store's read; waiters are counted by
the cache's read group, never by sleeping.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import threading
from typing import Any

import pytest
import redis
import redis.asyncio

from stampede import AsyncCoalescingCache, CoalescingCache
from stampede.backends import AsyncRedisBackend, RedisBackend
from stampede.testing import wait_until
from tests.support.redis_server import RedisServer

from .helpers import fork, in_thread, join_all, wait_child

N = 8  # readers of one key


def _getranges(observer: redis.Redis) -> int:
    """GETRANGE calls so far (a read of a stampede entry sends one)."""
    stats: Any = observer.info("commandstats")
    return int(stats.get("cmdstat_getrange", {"calls": 0})["calls"])


async def _until(condition: Any, what: str) -> None:
    """Return once ``condition()`` is true, letting the loop run; fail after 10 s."""

    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0)

    try:
        await asyncio.wait_for(poll(), 10)
    except asyncio.TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def _never() -> str:
    raise AssertionError("a hit must not load")


async def _anever() -> str:
    raise AssertionError("a hit must not load")


def test_threads_reading_one_key_share_one_round_trip(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    cache: CoalescingCache[str] = CoalescingCache(
        redis.Redis.from_url(redis_server.url, socket_timeout=10), ttl=60, namespace="co-t"
    )
    cache.set("k", "v")
    k, reads = cache._key("k"), cache._host.fences.reads
    before = _getranges(redis_client)
    with redis_server.paused():  # the first read is sent; its reply waits
        first, got = in_thread(lambda: cache.get_or_load("k", _never))
        wait_until(lambda: k in reads._reads, what="the first read in flight")
        others = [in_thread(lambda: cache.get_or_load("k", _never)) for _ in range(N - 1)]
        wait_until(lambda: reads.waiting(k) == N - 1, what="every other reader waiting")
    join_all([first, *(t for t, _ in others)])
    assert got + [v for _, out in others for v in out] == ["v"] * N
    assert _getranges(redis_client) - before == 1
    assert cache.stats().hits == N


def test_tasks_reading_one_key_share_one_round_trip(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    async def run() -> None:
        client = redis.asyncio.Redis.from_url(redis_server.url, socket_timeout=10)
        acache: AsyncCoalescingCache[str] = AsyncCoalescingCache(client, ttl=60, namespace="co-a")
        await acache.set("k", "v")
        k, reads = acache._key("k"), acache._host.fences.reads
        before = _getranges(redis_client)
        with redis_server.paused():
            tasks = [asyncio.ensure_future(acache.get_or_load("k", _anever)) for _ in range(N)]
            await _until(lambda: reads.waiting(k) == N - 1, "every other reader waiting")
        assert await asyncio.wait_for(asyncio.gather(*tasks), 10) == ["v"] * N
        assert _getranges(redis_client) - before == 1
        assert acache.stats().hits == N
        await client.aclose()

    asyncio.run(run())


class _GatedRedis(RedisBackend):
    """A real Redis store whose first read once armed waits at a gate before its
    round trip."""

    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self.armed = threading.Event()  # shared with the cache's view (a copy)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def _get_raw(self, key: str) -> tuple[bytes | int | None, float | None]:
        if self.armed.is_set() and not self.entered.is_set():
            self.entered.set()
            assert self.gate.wait(10)
        return super()._get_raw(key)


class _AsyncGatedRedis(AsyncRedisBackend):
    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self.armed = threading.Event()  # shared with the cache's view (a copy)
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def _aget_raw(self, key: str) -> tuple[bytes | int | None, float | None]:
        if self.armed.is_set() and not self.entered.is_set():
            self.entered.set()
            await self.gate.wait()
        return await super()._aget_raw(key)


@pytest.mark.parametrize("write", ["invalidate", "set"])
def test_a_read_begun_before_a_write_is_not_handed_to_a_reader_after_it(
    redis_url: str, write: str
) -> None:
    """A read in flight when ``invalidate``/``set`` of its key completes is not
    joined by a reader who comes after the write: that reader sees the write."""
    store = _GatedRedis(redis.Redis.from_url(redis_url))
    cache: CoalescingCache[str] = CoalescingCache(store, ttl=60, namespace=f"co-w-{write}")
    cache.set("k", "old")
    k, reads = cache._key("k"), cache._host.fences.reads
    store.armed.set()
    first, got = in_thread(lambda: cache.get("k"))
    assert store.entered.wait(10)  # the first read is in flight, held before its round trip
    if write == "set":
        cache.set("k", "new")
    else:
        cache.invalidate("k")
    after, seen = in_thread(lambda: cache.get("k"))
    # Joining the old read would wait at the gate: fail at once instead of hanging.
    wait_until(lambda: bool(seen) or reads.waiting(k) > 0, what="the later reader")
    assert reads.waiting(k) == 0, "the later reader joined a read begun before the write"
    join_all([after])
    assert seen == (["new"] if write == "set" else [None])
    store.gate.set()
    join_all([first])
    assert got[0] in ("old", "new", None)  # concurrent with the write: either state


@pytest.mark.parametrize("write", ["invalidate", "set"])
def test_a_task_after_a_write_does_not_join_a_read_begun_before_it(
    redis_url: str, write: str
) -> None:
    """``test_a_read_begun_before_a_write_is_not_handed_to_a_reader_after_it`` for
    tasks: the async fence forgets the key's read in flight once the write is done."""

    async def run() -> None:
        store = _AsyncGatedRedis(redis.asyncio.Redis.from_url(redis_url))
        acache: AsyncCoalescingCache[str] = AsyncCoalescingCache(
            store, ttl=60, namespace=f"co-aw-{write}"
        )
        await acache.set("k", "old")
        k, reads = acache._key("k"), acache._host.fences.reads
        store.armed.set()
        first = asyncio.ensure_future(acache.get("k"))
        await asyncio.wait_for(store.entered.wait(), 10)
        if write == "set":
            await acache.set("k", "new")
        else:
            await acache.invalidate("k")
        after = asyncio.ensure_future(acache.get("k"))
        await _until(lambda: after.done() or reads.waiting(k) > 0, "the later reader")
        assert reads.waiting(k) == 0, "the later task joined a read begun before the write"
        assert await after == ("new" if write == "set" else None)
        store.gate.set()
        assert await asyncio.wait_for(first, 10) in ("old", "new", None)

    asyncio.run(run())


def test_a_failing_read_fails_open_for_every_waiter(fresh_redis_server: RedisServer) -> None:
    """The first reader's round trip fails (the server is gone): every reader that
    waited for it gets the store-failure rules of its own read (fail open: the value
    is loaded), none hangs, none gets another's value."""
    store = _GatedRedis(redis.Redis.from_url(fresh_redis_server.url, socket_timeout=2))
    cache: CoalescingCache[str] = CoalescingCache(store, ttl=60, namespace="co-fail")
    cache.set("k", "stored")
    k, reads = cache._key("k"), cache._host.fences.reads
    store.armed.set()
    threads = [in_thread(lambda: cache.get_or_load("k", lambda: "loaded")) for _ in range(N)]
    assert store.entered.wait(10)
    wait_until(lambda: reads.waiting(k) == N - 1, what="every other reader waiting")
    fresh_redis_server.kill()  # the held read then fails for real
    store.gate.set()
    join_all([t for t, _ in threads])
    assert [v for _, out in threads for v in out] == ["loaded"] * N
    assert cache.stats().backend_errors >= N  # each reader's failed read, counted
    assert not reads._reads


def test_a_cancelled_reading_task_leaves_its_waiters_an_answer(redis_url: str) -> None:
    """The task whose read the others wait for is cancelled: they read again (one
    of them first) and all get the value; only the cancelled task is cancelled."""

    async def run() -> None:
        store = _AsyncGatedRedis(redis.asyncio.Redis.from_url(redis_url))
        acache: AsyncCoalescingCache[str] = AsyncCoalescingCache(store, ttl=60, namespace="co-c")
        await acache.set("k", "v")
        k, reads = acache._key("k"), acache._host.fences.reads
        store.armed.set()
        first = asyncio.ensure_future(acache.get_or_load("k", _anever))
        await asyncio.wait_for(store.entered.wait(), 10)
        others = [asyncio.ensure_future(acache.get_or_load("k", _anever)) for _ in range(N - 1)]
        await _until(lambda: reads.waiting(k) == N - 1, "every other reader waiting")
        first.cancel()
        assert await asyncio.wait_for(asyncio.gather(*others), 10) == ["v"] * (N - 1)
        with pytest.raises(asyncio.CancelledError):
            await first
        assert reads.waiting(k) == 0 and not reads._of_loop()
        assert acache.stats().hits == N - 1

    asyncio.run(run())


def test_a_child_forked_during_a_read_reads_on_its_own(
    redis_server: RedisServer, redis_url: str
) -> None:
    """Forked while a thread of the parent waits for a read's reply: the child's
    reader does not wait for the parent's read (its thread does not exist there)."""
    cache: CoalescingCache[str] = CoalescingCache(
        redis.Redis.from_url(redis_url, socket_timeout=10), ttl=60, namespace="co-fork"
    )
    cache.set("k", "v")
    k, reads = cache._key("k"), cache._host.fences.reads
    with redis_server.paused():
        first, got = in_thread(lambda: cache.get_or_load("k", _never))
        wait_until(lambda: k in reads._reads, what="the parent's read in flight")
        pid = fork()  # with threads running
        if pid == 0:  # the child: wait for the server, then read
            code = 1
            try:  # its read's reply comes once the parent resumes the server
                assert cache.get_or_load("k", _never) == "v"
                code = 0
            finally:
                os._exit(code)
    assert wait_child(pid, 20, "the child waited for its parent's read") == 0
    join_all([first])
    assert got == ["v"]


# -- many processes, many keys, many threads and tasks ------------------------------------

KEYS = [f"key-{i}" for i in range(6)]  # few keys, many readers: reads of one key overlap


def _value(key: str) -> str:
    return f"value of {key}"


def _reader_process(url: str, threads: int, rounds: int, seed: int) -> tuple[int, int]:
    """Read random keys from many threads, then many tasks: (reads, wrong answers)."""
    cache: CoalescingCache[str] = CoalescingCache(url, ttl=600, namespace="co-mp")
    counts = [0, 0]
    lock = threading.Lock()

    def reader(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        wrong = 0
        for _ in range(rounds):
            key = rng.choice(KEYS)
            if cache.get_or_load(key, lambda: "loaded") != _value(key):
                wrong += 1
        with lock:
            counts[0] += rounds
            counts[1] += wrong

    workers = [threading.Thread(target=reader, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)

    async def tasks() -> int:
        acache: AsyncCoalescingCache[str] = AsyncCoalescingCache(url, ttl=600, namespace="co-mp")

        async def loaded() -> str:
            return "loaded"

        async def task(n: int) -> int:
            rng = random.Random(seed * 1000 + 500 + n)
            wrong = 0
            for _ in range(rounds):
                key = rng.choice(KEYS)
                if await acache.get_or_load(key, loaded) != _value(key):
                    wrong += 1
            return wrong

        return sum(await asyncio.gather(*(task(n) for n in range(4 * threads))))

    wrong_in_tasks = asyncio.run(tasks())
    return counts[0] + 4 * threads * rounds, counts[1] + wrong_in_tasks


def test_coalesced_reads_never_return_another_keys_value(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """Processes x threads (then tasks) reading a few keys at random: every answer is
    its own key's value, and reads were shared (fewer round trips than reads)."""
    cache: CoalescingCache[str] = CoalescingCache(redis_url, ttl=600, namespace="co-mp")
    for key in KEYS:
        cache.set(key, _value(key))
    before = _getranges(redis_client)
    processes, threads, rounds = 3, 8, 150
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes) as pool:
        results = pool.starmap(
            _reader_process, [(redis_url, threads, rounds, seed) for seed in range(processes)]
        )
    reads = sum(r for r, _ in results)
    assert sum(w for _, w in results) == 0, "a reader got another key's value"
    assert reads == processes * 5 * threads * rounds
    assert _getranges(redis_client) - before < reads  # some reads were shared
