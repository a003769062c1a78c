"""Batch reads: ``get_many``, ``get_or_load_many`` and ``@cached_many`` (DESIGN.md item 41).

One store round trip for the lookups (counted by the Redis server itself), one
loader call for the keys a caller leads, each key still single-flight: in a
process (threads, tasks) and across processes (``distributed=True``, real
processes on a private Redis).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

import stampede
from stampede import AsyncCoalescingCache, CoalescingCache, cached_many
from stampede.testing import FakeClock, wait_until
from tests.helpers import disk_store, in_thread, join_all, run_threads

WORKER = Path(__file__).with_name("_batch_worker.py")


class Loads:
    """A ``load_many`` that records the keys of each call (thread-safe)."""

    def __init__(self, missing: frozenset[Any] = frozenset()) -> None:
        self.calls: list[list[Any]] = []
        self.missing = missing
        self._lock = threading.Lock()

    def __call__(self, keys: list[Any]) -> dict[Any, Any]:
        with self._lock:
            self.calls.append(list(keys))
        return {key: f"v{key}" for key in keys if key not in self.missing}


def reads(client: redis.Redis) -> int:
    """Read events the Redis server has processed (one per round trip of a client)."""
    return int(client.info("stats")["total_reads_processed"])


def getranges(client: redis.Redis) -> int:
    """``GETRANGE`` commands the Redis server has run (a stampede read sends one per key)."""
    stats = client.info("commandstats").get("cmdstat_getrange", {})
    return int(stats.get("calls", 0))


# -- in one process -----------------------------------------------------------------------


def test_only_missing_keys_are_loaded_in_one_call_and_every_key_is_returned() -> None:
    cache: CoalescingCache[Any] = CoalescingCache(ttl=60)
    load = Loads()
    assert cache.get_or_load_many([1, 2, 3, 2], load) == {1: "v1", 2: "v2", 3: "v3"}
    assert cache.get_or_load_many([3, 4, 1], load) == {3: "v3", 4: "v4", 1: "v1"}
    assert load.calls == [[1, 2, 3], [4]]
    assert list(cache.get_or_load_many([4, 1], load)) == [4, 1]  # the order asked
    assert cache.get_many([1, 5, 4]) == {1: "v1", 4: "v4"}  # missing keys left out
    assert load.calls == [[1, 2, 3], [4]]


def test_a_key_left_out_raises_key_error_and_the_others_are_stored() -> None:
    cache: CoalescingCache[Any] = CoalescingCache(ttl=60)
    load = Loads(missing=frozenset({2}))
    with pytest.raises(KeyError, match="no value for 2"):
        cache.get_or_load_many([1, 2, 3], load)
    assert cache.get_many([1, 2, 3]) == {1: "v1", 3: "v3"}


def test_a_mapping_is_required() -> None:
    cache: CoalescingCache[Any] = CoalescingCache(ttl=60)
    with pytest.raises(TypeError, match="mapping"):
        cache.get_or_load_many([1], lambda keys: [1])  # type: ignore[arg-type,return-value]
    assert cache.get_many([1]) == {}


def test_keys_in_flight_are_joined_not_loaded_again() -> None:
    cache: CoalescingCache[Any] = CoalescingCache(ttl=60)
    started, release = threading.Event(), threading.Event()

    def slow_single() -> str:
        started.set()
        assert release.wait(5)
        return "single-2"

    single, single_out = in_thread(lambda: cache.get_or_load(2, slow_single))
    assert started.wait(5)
    load = Loads()
    batch, batch_out = in_thread(lambda: cache.get_or_load_many([1, 2, 3], load))
    wait_until(lambda: cache.stats().coalesced == 1, what="the batch waiting for key 2")
    assert load.calls == [[1, 3]]  # 2 is someone else's load
    release.set()
    single.join(5), batch.join(5)
    assert batch_out == [{1: "v1", 2: "single-2", 3: "v3"}] and single_out == ["single-2"]


def test_overlapping_batches_in_threads_load_each_key_once() -> None:
    cache: CoalescingCache[Any] = CoalescingCache(ttl=60)
    gate = threading.Event()
    loaded: list[Any] = []
    lock = threading.Lock()

    def load(keys: list[int]) -> dict[int, int]:
        with lock:
            loaded.extend(keys)
        assert gate.wait(5)
        return {key: key * 10 for key in keys}

    got: list[dict[int, int]] = []
    def call(i: int) -> None:
        got.append(cache.get_or_load_many(range(i, i + 8), load))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(0, 40, 3)]
    for t in threads:
        t.start()
    wait_until(lambda: cache.stats().misses == 14 * 8, what="every key of every call asked")
    gate.set()
    join_all(threads)
    assert sorted(loaded) == list(range(47))  # each key once
    assert all(value == key * 10 for result in got for key, value in result.items())


def test_a_failed_batch_reaches_every_key_and_negative_caches_each() -> None:
    clock = FakeClock()
    cache: CoalescingCache[Any] = CoalescingCache(ttl=60, cache_errors=(LookupError,), clock=clock)
    calls = 0

    def fail(keys: list[int]) -> dict[int, int]:
        nonlocal calls
        calls += 1
        raise LookupError("gone")

    with pytest.raises(LookupError):
        cache.get_or_load_many([1, 2], fail)
    with pytest.raises(LookupError):  # a negative-cached key raises its error
        cache.get_or_load_many([2, 3], Loads())
    with pytest.raises(LookupError):
        cache.get_or_load(1, lambda: "no")
    assert calls == 1 and cache.stats().negative_hits == 2


def test_stale_keys_are_served_and_refreshed_alone_in_the_background() -> None:
    clock = FakeClock()
    cache: CoalescingCache[Any] = CoalescingCache(ttl=10, stale_ttl=100, beta=0, clock=clock)
    load = Loads()
    cache.get_or_load_many([1, 2], load)
    clock.advance(11)
    assert cache.get_or_load_many([1, 2], load) == {1: "v1", 2: "v2"}  # stale, served
    wait_until(lambda: len(load.calls) == 3, what="two background refreshes")
    assert sorted(load.calls[1:]) == [[1], [2]]  # each refresh loads its key alone


def test_recursion_through_the_batch_loader_is_detected() -> None:
    cache: CoalescingCache[Any] = CoalescingCache(ttl=60)

    def again(keys: list[int]) -> dict[int, int]:
        return cache.get_or_load_many(keys, again)

    with pytest.raises(stampede.RecursiveLoad):
        cache.get_or_load_many([1, 2], again)
    assert cache.get_or_load_many([1, 2], Loads()) == {1: "v1", 2: "v2"}  # nothing left hanging


def test_async_tasks_load_each_key_once() -> None:
    async def main() -> None:
        cache: AsyncCoalescingCache[Any] = AsyncCoalescingCache(ttl=60)
        gate = asyncio.Event()
        loaded: list[int] = []

        async def load(keys: list[int]) -> dict[int, int]:
            loaded.extend(keys)
            await gate.wait()
            return {key: -key for key in keys}

        tasks = [
            asyncio.create_task(cache.get_or_load_many(range(i, i + 10), load))
            for i in range(1000)
        ]
        await asyncio.sleep(0)
        while cache.stats().misses < 1009:
            await asyncio.sleep(0)
        gate.set()
        results = await asyncio.gather(*tasks)
        assert sorted(loaded) == list(range(1009))  # each key once
        assert all(results[i] == {k: -k for k in range(i, i + 10)} for i in range(1000))
        assert await cache.get_many([3, 5000]) == {3: -3}

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_cancelled_async_caller_leaves_the_batch_to_the_others() -> None:
    async def main() -> None:
        cache: AsyncCoalescingCache[Any] = AsyncCoalescingCache(ttl=60)
        gate = asyncio.Event()
        calls = 0

        async def load(keys: list[int]) -> dict[int, int]:
            nonlocal calls
            calls += 1
            await gate.wait()
            return {key: key for key in keys}

        first = asyncio.create_task(cache.get_or_load_many([1, 2], load))
        while calls == 0:
            await asyncio.sleep(0)
        second = asyncio.create_task(cache.get_or_load_many([1, 2], load))
        while cache.stats().coalesced < 1:  # waiting on key 1 (then key 2)
            await asyncio.sleep(0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        gate.set()
        assert await second == {1: 1, 2: 2} and calls == 1
        assert await cache.get_many([1, 2]) == {1: 1, 2: 2}  # stored though its caller left

    asyncio.run(asyncio.wait_for(main(), 10))


# -- one round trip on the shared stores -----------------------------------------------------


def test_redis_lookups_take_one_round_trip(redis_client: redis.Redis) -> None:
    cache: CoalescingCache[Any] = CoalescingCache(redis_client, ttl=60, namespace="rt")
    # Few enough keys that the pipeline is one write (redis-py sends a long one in
    # chunks, which the server may read in two events).
    keys = list(range(20))
    cache.get_or_load_many(keys, Loads())
    reads(redis_client)
    before = reads(redis_client)
    assert cache.get_many(keys) == {key: f"v{key}" for key in keys}
    one_batch = reads(redis_client) - before - 1  # minus this INFO's own read
    before = reads(redis_client)
    assert cache.get_or_load_many(keys, Loads()) == {key: f"v{key}" for key in keys}
    one_more = reads(redis_client) - before - 1
    before = reads(redis_client)
    for key in keys:
        cache.get(key)
    one_by_one = reads(redis_client) - before - 1
    assert one_batch == 1 and one_more == 1 and one_by_one == 20


def test_async_redis_and_cluster_batches(redis_url: str, redis_cluster: Any) -> None:
    async def main() -> None:
        for url, client_type in [
            (redis_url, redis.asyncio.Redis),
            (redis_cluster.url, redis.asyncio.RedisCluster),
        ]:
            client = client_type.from_url(url)
            cache: AsyncCoalescingCache[Any] = AsyncCoalescingCache(
                client, ttl=60, namespace=f"b-{uuid.uuid4().hex[:6]}"
            )
            load = Loads()
            keys = [f"k{i}" for i in range(30)]
            assert await cache.get_or_load_many(keys, load) == {k: f"v{k}" for k in keys}
            assert await cache.get_or_load_many(keys, load) == {k: f"v{k}" for k in keys}
            assert load.calls == [keys]
            assert await cache.get_many(["k1", "nope"]) == {"k1": "vk1"}
            await client.aclose()

    asyncio.run(main())


def test_an_entry_longer_than_the_read_prefix_is_read_whole(redis_client: redis.Redis) -> None:
    cache: CoalescingCache[Any] = CoalescingCache(redis_client, ttl=60, namespace="long")
    big = "x" * 200_000
    cache.get_or_load_many(["big", "small"], lambda ks: {k: big if k == "big" else 1 for k in ks})
    assert cache.get_many(["big", "small"]) == {"big": big, "small": 1}


def test_a_corrupt_entry_in_a_batch_is_a_counted_miss(redis_client: redis.Redis) -> None:
    cache: CoalescingCache[Any] = CoalescingCache(redis_client, ttl=60, namespace="bad")
    cache.get_or_load_many(["a", "b"], Loads())
    key = next(k for k in redis_client.scan_iter("stampede:*") if k.endswith(b":b"))
    redis_client.set(key, b"garbage", ex=60)
    load = Loads()
    assert cache.get_or_load_many(["a", "b"], load) == {"a": "va", "b": "vb"}
    assert load.calls == [["b"]] and cache.stats().serialization_errors == 1


def test_disk_batches_read_in_one_query(tmp_path: Path) -> None:
    cache: CoalescingCache[Any] = CoalescingCache(disk_store(tmp_path), ttl=60)
    keys = [f"k{i}" for i in range(1200)]  # more than one query's worth of keys
    load = Loads()
    assert cache.get_or_load_many(keys, load) == {k: f"v{k}" for k in keys}
    assert cache.get_or_load_many(keys, load) == {k: f"v{k}" for k in keys}
    assert load.calls == [keys]
    assert cache.get_many(["k1", "nope"]) == {"k1": "vk1"}


def test_near_copies_answer_a_batch_with_no_round_trip(redis_client: redis.Redis) -> None:
    cache: CoalescingCache[Any] = CoalescingCache(
        redis_client, ttl=60, namespace=f"near-{uuid.uuid4().hex[:6]}", near_maxsize=100
    )
    keys = list(range(20))
    near = cache._near
    assert near is not None
    wait_until(lambda: near.ready, what="the near cache listening")
    cache.get_or_load_many(keys, Loads())
    # This process hears its own writes too: once it has, what it reads is kept.
    wait_until(lambda: near.heard >= 20, what="the writes' announcements")
    cache.get_many(keys)  # read once: the near tier keeps them
    before = getranges(redis_client)
    assert cache.get_or_load_many(keys, Loads()) == {key: f"v{key}" for key in keys}
    assert getranges(redis_client) == before  # not one read reached Redis
    assert cache.stats().near_hits >= 20


# -- across processes ------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_processes_with_overlapping_batches_load_each_key_once(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, flavour: str
) -> None:
    keys = [f"k{i}" for i in range(20)]
    namespace = f"fleet-{flavour}"
    args = (",".join(keys), flavour)
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), *(redis_url, namespace, str(tmp_path), "5"), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    try:
        wait_until(lambda: len(list(tmp_path.glob("ready-*"))) == 6, 60, "workers ready")
        (tmp_path / "go").touch()
        wait_until(lambda: (tmp_path / "loading").exists(), 60, "a batch loading")
        (tmp_path / "release").touch()
        reports = []
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert all(report["right"] for report in reports)
    counts = {key: int(redis_client.get(f"loads:{namespace}:{key}") or 0) for key in keys}
    assert counts == {key: 1 for key in keys}  # each key loaded once in the fleet


def test_a_key_whose_lease_is_held_elsewhere_is_waited_for(redis_url: str) -> None:
    holder: CoalescingCache[Any] = CoalescingCache(
        redis.Redis.from_url(redis_url), ttl=60, distributed=True, namespace="held"
    )
    other: CoalescingCache[Any] = CoalescingCache(
        redis.Redis.from_url(redis_url), ttl=60, distributed=True, namespace="held"
    )
    started, release = threading.Event(), threading.Event()

    def slow() -> str:
        started.set()
        assert release.wait(10)
        return "from-holder"

    thread, out = in_thread(lambda: holder.get_or_load("b", slow))
    assert started.wait(10)
    load = Loads()
    batch, batch_out = in_thread(lambda: other.get_or_load_many(["a", "b"], load))
    wait_until(lambda: other.stats().lease_waits >= 1, what="waiting for b's lease")
    assert load.calls == [["a"]]
    release.set()
    thread.join(10), batch.join(10)
    assert batch_out == [{"a": "va", "b": "from-holder"}] and out == ["from-holder"]


# -- @cached_many ------------------------------------------------------------------------------


def test_cached_many_calls_the_function_with_the_missing_ids_only() -> None:
    calls: list[tuple[list[int], str]] = []

    @cached_many(ttl=60)
    def users(ids: list[int], *, tenant: str = "a") -> dict[int, str]:
        calls.append((list(ids), tenant))
        return {i: f"{tenant}{i}" for i in ids}

    assert users([1, 2]) == {1: "a1", 2: "a2"}
    assert users([2, 3]) == {2: "a2", 3: "a3"}
    assert users([2], tenant="b") == {2: "b2"}  # the other arguments are part of the key
    assert calls == [([1, 2], "a"), ([3], "a"), ([2], "b")]
    users.invalidate([2])
    assert users([1, 2]) == {1: "a1", 2: "a2"} and calls[-1] == ([2], "a")
    assert users.cache_info().currsize == 4
    with pytest.raises(TypeError, match="collection of ids"):
        users("12")


def test_cached_many_async_on_a_shared_cache_with_its_own_ttl() -> None:
    async def main() -> None:
        clock = FakeClock()
        shared: AsyncCoalescingCache[Any] = AsyncCoalescingCache(ttl=600, clock=clock, beta=0)
        calls: list[list[int]] = []

        @cached_many(cache=shared, ttl=5)
        async def prices(ids: list[int]) -> dict[int, float]:
            calls.append(list(ids))
            return {i: i / 2 for i in ids if i != 13}

        assert await prices(range(3)) == {0: 0.0, 1: 0.5, 2: 1.0}
        clock.advance(6)
        assert await prices([2]) == {2: 1.0}
        assert calls == [[0, 1, 2], [2]]
        with pytest.raises(KeyError):
            await prices([13])
        await prices.cache_clear()
        assert await prices([0]) == {0: 0.0} and calls[-1] == [0]

    asyncio.run(main())


def test_cached_many_on_redis_from_threads(redis_client: redis.Redis) -> None:
    calls: list[list[int]] = []
    lock = threading.Lock()
    gate = threading.Event()

    @cached_many(cache=redis_client, ttl=60)
    def rows(ids: list[int]) -> dict[int, dict[str, int]]:
        with lock:
            calls.append(list(ids))
        assert gate.wait(5)
        return {i: {"id": i} for i in ids}

    results: list[dict[int, Any]] = []
    threads = run_threads(8, lambda: results.append(rows(range(10))))
    wait_until(lambda: rows.cache.stats().coalesced == 7, what="the other callers waiting")
    gate.set()
    join_all(threads)
    assert calls == [list(range(10))]
    assert all(result == {i: {"id": i} for i in range(10)} for result in results)


# -- regressions found in review ----------------------------------------------------------------


def test_a_batch_recursing_into_a_key_it_loads_leaves_no_flight_behind() -> None:
    cache: CoalescingCache[Any] = CoalescingCache(ttl=60)

    def outer() -> Any:
        return cache.get_or_load_many(["y", "x"], Loads())  # x is being loaded: recursion

    with pytest.raises(stampede.RecursiveLoad):
        cache.get_or_load("x", outer)
    assert len(cache._flight) == 0  # y's flight, led by the batch, was finished
    assert cache.get_or_load("y", lambda: "loaded") == "loaded"


def test_an_async_batch_recursing_leaves_no_flight_and_no_key_error() -> None:
    async def main() -> None:
        cache: AsyncCoalescingCache[Any] = AsyncCoalescingCache(ttl=60)

        async def outer() -> Any:
            return await cache.get_or_load_many(["y", "x"], Loads())

        with pytest.raises(stampede.RecursiveLoad):
            await cache.get_or_load("x", outer)
        for _ in range(3):
            await asyncio.sleep(0)
        assert await cache.get_or_load("y", lambda: "loaded") in ("loaded", "vy")

    asyncio.run(asyncio.wait_for(main(), 10))


@pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.eager_task_factory is 3.12+")
def test_async_batches_work_with_an_eager_task_factory() -> None:
    async def main() -> None:
        asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
        cache: AsyncCoalescingCache[Any] = AsyncCoalescingCache(ttl=60)
        assert await cache.get_or_load_many([1, 2], Loads()) == {1: "v1", 2: "v2"}

    asyncio.run(main())


def test_a_refused_value_does_not_drop_a_newer_write_made_meanwhile(redis_url: str) -> None:
    ns = f"refused-{uuid.uuid4().hex[:6]}"
    leader: CoalescingCache[Any] = CoalescingCache(
        redis.Redis.from_url(redis_url),
        ttl=60,
        distributed=True,
        namespace=ns,
        cache_if=lambda v: v != "refused",
    )
    writer: CoalescingCache[Any] = CoalescingCache(
        redis.Redis.from_url(redis_url), ttl=60, distributed=True, namespace=ns
    )
    leader.set("k", "old")
    started, release = threading.Event(), threading.Event()

    def slow() -> str:
        started.set()
        assert release.wait(10)
        return "refused"

    thread, out = in_thread(lambda: leader.refresh("k", slow))
    assert started.wait(10)
    writer.set("k", "new")  # breaks the leader's lease and writes
    release.set()
    thread.join(10)
    assert out == ["refused"]
    assert writer.get("k") == "new"  # the leader, fenced, dropped nothing


def test_cached_many_with_typed_keys_never_mixes_equal_ids() -> None:
    calls: list[list[Any]] = []

    @cached_many(typed=True)
    def f(ids: list[Any]) -> dict[Any, str]:
        calls.append(list(ids))
        return {i: f"{type(i).__name__}:{i}" for i in ids}

    assert f([1, True]) == {1: "int:1"}  # equal ids are one id: the first one's
    assert f([True]) == {True: "bool:True"}  # its own key, loaded for itself
    assert calls == [[1], [True]]
