"""The near cache (DESIGN.md section 7, contract items 28-32), on a real Redis and
real diskcache folders, with real processes for what crosses processes.

Waits are on conditions (``wait_until``), never sleeps; every test has a hard
timeout. The near tier's own state (``cache._near``) is read to see what it
holds; what a reader gets is always asked through the public API.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio

from stampede import AsyncCoalescingCache, CoalescingCache, cached
from stampede.testing import FakeClock, async_wait_until, wait_until
from tests.support.redis_server import RedisServer

from .helpers import disk_store

pytestmark = pytest.mark.timeout(60)

LONG = 600.0  # a near_ttl no test waits out: a copy dropped sooner was dropped by a message


def _own() -> str:
    """A namespace of the test's own: no other test's writes are announced on it."""
    return f"near-{uuid.uuid4().hex}"


def _never() -> str:
    raise AssertionError("a near hit must not load")


def _getranges(observer: redis.Redis) -> int:
    stats: Any = observer.info("commandstats")
    return int(stats.get("cmdstat_getrange", {"calls": 0})["calls"])


def _ready(cache: Any) -> bool:
    near = cache._near
    return bool(near is not None and near.ready)


def _holds(cache: Any, key: str) -> bool:
    return cache._near.get(cache._key(key)) is not None


def _set_heard(cache: Any, key: str, value: Any) -> None:
    """``cache.set`` and wait until its own announcement has come back (so that it
    cannot drop a copy kept after it)."""
    heard = cache._near.heard
    cache.set(key, value)
    wait_until(lambda: cache._near.heard > heard, 10, "the set's own message")


# -- options -----------------------------------------------------------------------


def test_a_near_cache_of_a_store_in_this_process_is_refused() -> None:
    with pytest.raises(ValueError, match="near_maxsize"):
        CoalescingCache(ttl=60, near_maxsize=10)
    with pytest.raises(ValueError, match="near_maxsize"):
        CoalescingCache({}, ttl=60, near_maxsize=10)
    with pytest.raises(ValueError, match="near_maxsize"):
        AsyncCoalescingCache(ttl=60, near_maxsize=10)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"near_maxsize": -1}, ValueError),
        ({"near_maxsize": 1.5}, TypeError),
        ({"near_maxsize": True}, TypeError),
        ({"near_maxsize": 10, "near_ttl": 0}, ValueError),
        ({"near_maxsize": 10, "near_ttl": float("inf")}, ValueError),
    ],
)
def test_near_options_are_checked(tmp_path: Path, options: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        CoalescingCache(disk_store(tmp_path), ttl=60, **options)


# -- Redis, one process ------------------------------------------------------------------


def test_a_near_hit_does_no_io_and_is_counted_apart(
    redis_server: RedisServer, redis_url: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    observer = redis_server.client()
    cache: CoalescingCache[str] = CoalescingCache(
        client, ttl=60, near_maxsize=10, near_ttl=LONG, namespace=_own()
    )
    wait_until(lambda: _ready(cache), 10, "the near cache's channel")
    near = cache._near
    assert near is not None
    assert cache.get_or_load("k", lambda: "v") == "v"  # loaded, written, announced
    wait_until(lambda: near.heard >= 1, 10, "the load's own announcement")
    assert cache.get_or_load("k", _never) == "v" and _holds(cache, "k")
    before = _getranges(observer)
    assert [cache.get_or_load("k", _never) for _ in range(50)] == ["v"] * 50
    assert _getranges(observer) == before  # no read reached Redis
    s = cache.stats()
    assert s.near_hits >= 50 and s.hits >= s.near_hits
    client.close()
    observer.close()


def test_the_decorator_serves_near_hits(redis_url: str) -> None:
    calls: list[int] = []

    @cached(
        cache=redis.Redis.from_url(redis_url),
        ttl=60,
        near_maxsize=10,
        near_ttl=LONG,
        namespace=_own(),
    )
    def double(x: int) -> int:
        calls.append(x)
        return 2 * x

    wait_until(lambda: _ready(double.cache), 10, "the near cache's channel")
    near = double.cache._near
    assert near is not None
    assert double(2) == 4
    wait_until(lambda: near.heard >= 1, 10, "the load's own announcement")
    assert double(2) == 4 and len(near) == 1
    hits = double.cache.stats().near_hits
    assert [double(2) for _ in range(20)] == [4] * 20
    assert double.cache.stats().near_hits == hits + 20 and calls == [2]


def test_own_writes_drop_the_copy_at_once(redis_url: str) -> None:
    cache: CoalescingCache[str] = CoalescingCache(
        redis.Redis.from_url(redis_url), ttl=60, near_maxsize=10, near_ttl=LONG
    )
    wait_until(lambda: _ready(cache), 10)
    cache.set("k", "v1")
    wait_until(lambda: cache.get("k") == "v1" and _holds(cache, "k"), 10)
    cache.set("k", "v2")
    assert cache.get("k") == "v2"  # no message needed: the set's fence dropped it
    cache.invalidate("k")
    assert cache.get("k") is None
    cache.set("k", "v3")
    wait_until(lambda: cache.get("k") == "v3" and _holds(cache, "k"), 10)
    cache.clear()
    assert cache.get("k") is None and len(cache._near) == 0  # type: ignore[arg-type]


def test_a_fenced_load_reaches_no_near_cache(redis_url: str) -> None:
    """A load invalidated while it runs is not stored, and leaves no near copy."""
    cache: CoalescingCache[str] = CoalescingCache(
        redis.Redis.from_url(redis_url), ttl=60, near_maxsize=10, near_ttl=LONG
    )
    wait_until(lambda: _ready(cache), 10)
    started, release = threading.Event(), threading.Event()

    def slow() -> str:
        started.set()
        assert release.wait(10)
        return "old"

    got: list[str] = []
    loader = threading.Thread(target=lambda: got.append(cache.get_or_load("k", slow)))
    loader.start()
    assert started.wait(10)
    cache.invalidate("k")
    release.set()
    loader.join(10)
    assert got == ["old"] and cache.stats().fenced == 1
    assert not _holds(cache, "k") and cache.get("k") is None
    assert cache.get_or_load("k", lambda: "new") == "new"


def test_a_copy_is_never_served_past_near_ttl(redis_url: str) -> None:
    """A write made behind stampede's back (no announcement) is seen once the copy's
    near_ttl has passed: the copy is not served a moment longer."""
    clock = FakeClock()
    client = redis.Redis.from_url(redis_url)
    cache: CoalescingCache[str] = CoalescingCache(
        client, ttl=60, near_maxsize=10, near_ttl=2.0, clock=clock, namespace=_own()
    )
    wait_until(lambda: _ready(cache), 10)
    _set_heard(cache, "k", "v")
    assert cache.get("k") == "v" and _holds(cache, "k")
    client.delete(cache._key("k"))  # type: ignore[arg-type]  # not announced
    clock.advance(1.9)
    assert cache.get("k") == "v"  # inside near_ttl: the copy
    clock.advance(0.1)
    assert cache.get("k") is None  # its near_ttl is over: Redis, which has nothing
    client.close()


def test_a_copy_ends_with_its_entry(redis_url: str) -> None:
    clock = FakeClock()
    cache: CoalescingCache[str] = CoalescingCache(
        redis.Redis.from_url(redis_url), ttl=1.0, beta=0, near_maxsize=10, near_ttl=LONG,
        clock=clock,
    )
    wait_until(lambda: _ready(cache), 10)
    cache.set("k", "v")
    wait_until(lambda: cache.get("k") == "v" and _holds(cache, "k"), 10)
    clock.advance(1.0)
    assert cache.get_or_load("k", lambda: "reloaded") == "reloaded"


def test_the_near_cache_is_bounded(redis_url: str) -> None:
    cache: CoalescingCache[int] = CoalescingCache(
        redis.Redis.from_url(redis_url), ttl=60, near_maxsize=5, near_ttl=LONG
    )
    wait_until(lambda: _ready(cache), 10)
    for i in range(20):
        cache.set(f"k{i}", i)
    for i in range(20):
        assert cache.get(f"k{i}") == i
    assert len(cache._near) <= 5  # type: ignore[arg-type]


def test_a_lost_channel_empties_the_near_cache_and_no_stale_copy_is_served(
    fresh_redis_server: RedisServer,
) -> None:
    """``CLIENT KILL TYPE pubsub``: the tier is emptied and bypassed until it has
    subscribed again; a write announced meanwhile (lost to it) is read from Redis."""
    server = fresh_redis_server
    reader: CoalescingCache[str] = CoalescingCache(
        redis.Redis.from_url(server.url), ttl=60, near_maxsize=10, near_ttl=LONG
    )
    writer: CoalescingCache[str] = CoalescingCache(redis.Redis.from_url(server.url), ttl=60)
    wait_until(lambda: _ready(reader), 10)
    writer.set("k", "v1")
    wait_until(lambda: reader.get("k") == "v1" and _holds(reader, "k"), 10)
    admin = server.client()
    assert admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 1
    wait_until(lambda: not _ready(reader), 10, "the loss to be seen")
    assert len(reader._near) == 0  # type: ignore[arg-type]
    writer.set("k", "v2")  # announced while the reader's listener is away
    assert reader.get("k") == "v2"  # from Redis: the tier keeps nothing while down
    assert not _holds(reader, "k") or _ready(reader)
    wait_until(lambda: _ready(reader), 10, "the channel to come back")
    wait_until(lambda: reader.get("k") == "v2" and _holds(reader, "k"), 10)
    writer.set("k", "v3")  # heard again
    wait_until(lambda: reader.get("k") == "v3", 10, "the new value after the reconnect")
    admin.close()


# -- across processes ----------------------------------------------------------------------


def _writer_process(url: str, commands: Any, done: Any) -> None:
    """Another process writing through a cache on the same Redis (no near tier)."""
    cache: CoalescingCache[str] = CoalescingCache(redis.Redis.from_url(url), ttl=60)
    while True:
        command = commands.get(timeout=30)
        if command is None:
            return
        what, key, value = command
        if what == "set":
            cache.set(key, value)
        elif what == "invalidate":
            cache.invalidate(key)
        elif what == "clear":
            cache.clear()
        done.put(command)


def test_another_processs_writes_are_seen_within_a_bounded_wait(redis_url: str) -> None:
    context = multiprocessing.get_context("spawn")
    commands, done = context.Queue(), context.Queue()
    writer = context.Process(target=_writer_process, args=(redis_url, commands, done))
    writer.start()
    try:
        reader: CoalescingCache[str] = CoalescingCache(
            redis.Redis.from_url(redis_url), ttl=60, near_maxsize=10, near_ttl=LONG
        )
        wait_until(lambda: _ready(reader), 10)

        def step(command: tuple[str, str, str | None]) -> None:
            commands.put(command)
            assert done.get(timeout=30) == command

        step(("set", "k", "v1"))
        wait_until(lambda: reader.get("k") == "v1" and _holds(reader, "k"), 10)
        step(("set", "k", "v2"))
        wait_until(lambda: reader.get("k") == "v2", 5, "another process's set")
        wait_until(lambda: _holds(reader, "k"), 5)
        step(("invalidate", "k", None))
        wait_until(lambda: reader.get("k") is None, 5, "another process's invalidate")
        step(("set", "k", "v3"))
        wait_until(lambda: reader.get("k") == "v3" and _holds(reader, "k"), 5)
        step(("clear", "", None))
        wait_until(lambda: reader.get("k") is None, 5, "another process's clear")
    finally:
        commands.put(None)
        writer.join(30)
        if writer.is_alive():
            writer.kill()
    assert writer.exitcode == 0


# -- asyncio -----------------------------------------------------------------------------


def test_async_near_hits_and_another_clients_writes(redis_url: str) -> None:
    async def main() -> None:
        namespace = _own()
        reader: AsyncCoalescingCache[str] = AsyncCoalescingCache(
            redis.asyncio.Redis.from_url(redis_url),
            ttl=60,
            near_maxsize=10,
            near_ttl=LONG,
            namespace=namespace,
        )
        writer: AsyncCoalescingCache[str] = AsyncCoalescingCache(
            redis.asyncio.Redis.from_url(redis_url), ttl=60, namespace=namespace
        )
        assert await reader.get("k") is None  # the first read registers the listener
        await async_wait_until(lambda: _ready(reader), 10, "the near cache's channel")
        near = reader._near
        assert near is not None
        await writer.set("k", "v1")
        await async_wait_until(lambda: near.heard >= 1, 10, "the set's announcement")

        async def holds(value: str) -> bool:
            return await reader.get("k") == value and _holds(reader, "k")

        end = asyncio.get_running_loop().time() + 10
        while not await holds("v1"):
            assert asyncio.get_running_loop().time() < end, "v1 never kept"
            await asyncio.sleep(0.001)
        hits = reader.stats().near_hits
        for _ in range(10):
            assert await reader.get_or_load("k", _anever) == "v1"
        assert reader.stats().near_hits == hits + 10
        await writer.set("k", "v2")
        end = asyncio.get_running_loop().time() + 5
        while await reader.get("k") != "v2":
            assert asyncio.get_running_loop().time() < end, "another client's set unseen"
            await asyncio.sleep(0.001)

    asyncio.run(main())


async def _anever() -> str:
    raise AssertionError("a near hit must not load")


# -- diskcache ---------------------------------------------------------------------------


def test_disk_near_copies_are_bounded_by_near_ttl(tmp_path: Path) -> None:
    """A folder has no channel: another cache's write (another process's, here a
    second cache on the folder) is seen once the copy's near_ttl is over; this
    cache's own writes drop its copy at once."""
    clock = FakeClock()
    folder = disk_store(tmp_path)
    reader: CoalescingCache[str] = CoalescingCache(
        folder, ttl=60, near_maxsize=10, near_ttl=1.0, clock=clock
    )
    other: CoalescingCache[str] = CoalescingCache(folder, ttl=60, clock=clock)
    assert _ready(reader)  # no channel to wait for
    reader.set("k", "v1")
    assert reader.get("k") == "v1" and _holds(reader, "k")
    other.set("k", "v2")
    assert reader.get_or_load("k", _never) == "v1"  # the copy, within near_ttl
    assert reader.stats().near_hits == 1
    clock.advance(1.0)
    assert reader.get("k") == "v2"
    reader.set("k", "v3")
    assert reader.get("k") == "v3"


def test_near_hits_of_equal_arguments_of_other_types_stay_apart(tmp_path: Path) -> None:
    """The hit path looks up kept text keys by the args tuple for str and int
    arguments only: 1, 1.0 and True (equal, one hash) are three keys."""
    calls: list[Any] = []

    @cached(cache=disk_store(tmp_path), ttl=60, near_maxsize=10)
    def kind(x: Any) -> str:
        calls.append(x)
        return type(x).__name__

    for _ in range(3):  # loaded, read into the near cache, then near hits
        assert [kind(1), kind(1.0), kind(True), kind("1")] == ["int", "float", "bool", "str"]
    assert len(calls) == 4 and kind.cache.stats().near_hits >= 4


class NotFound(LookupError):
    pass


def test_a_negative_entry_is_raised_again_from_its_near_copy(tmp_path: Path) -> None:
    clock = FakeClock()
    cache: CoalescingCache[str] = CoalescingCache(
        disk_store(tmp_path),
        ttl=60,
        near_maxsize=10,
        cache_errors=(NotFound,),
        error_ttl=10,
        clock=clock,
    )
    calls: list[int] = []

    def missing() -> str:
        calls.append(1)
        raise NotFound("no such user")

    for _ in range(4):
        with pytest.raises(NotFound):
            cache.get_or_load("u", missing)
    k = cache._key("u")
    assert cache._near is not None and cache._near.entry(k, clock()) is not None  # kept
    assert calls == [1] and cache.stats().negative_hits == 3
    clock.advance(10)  # the error's time is over: the copy with it
    assert cache.get_or_load("u", lambda: "found") == "found"


def test_a_stale_near_copy_is_served_while_the_refresh_runs(tmp_path: Path) -> None:
    clock = FakeClock()
    cache: CoalescingCache[str] = CoalescingCache(
        disk_store(tmp_path), ttl=1, beta=0, stale_ttl=10, near_maxsize=10, clock=clock
    )
    assert cache.get_or_load("k", lambda: "v1") == "v1"
    assert cache.get_or_load("k", _never) == "v1" and _holds(cache, "k")
    clock.advance(1.5)  # past ttl, within stale_ttl: stale, from the near copy
    release = threading.Event()

    def refresh() -> str:
        assert release.wait(10)
        return "v2"

    assert cache.get_or_load("k", refresh) == "v1"
    assert cache.stats().stale_served == 1
    release.set()
    wait_until(lambda: cache.get_or_load("k", _never) == "v2", 10, "the refreshed value")


def test_a_copy_whose_early_refresh_runs_is_served_by_the_hit_path(tmp_path: Path) -> None:
    """Past its XFetch point, a copy's first read starts the refresh; later reads are
    near hits again until the refreshed value replaces it, not a decision each."""
    clock = FakeClock()
    cache: CoalescingCache[str] = CoalescingCache(
        disk_store(tmp_path), ttl=10, beta=1.0, near_maxsize=10, clock=clock
    )

    def slow_v1() -> str:
        clock.advance(2.0)  # the load's duration: XFetch refreshes about that early
        return "v1"

    assert cache.get_or_load("k", slow_v1) == "v1"
    assert cache.get_or_load("k", _never) == "v1"  # read into the near cache
    near = cache._near
    assert near is not None
    entry = near.entry(cache._key("k"), clock())
    assert entry is not None and entry.check_at < entry.fresh_until
    clock.set(entry.check_at)  # due for its early refresh, still fresh
    release = threading.Event()

    def gated() -> str:
        assert release.wait(10)
        return "v2"

    assert cache.get_or_load("k", gated) == "v1"  # the decision: a refresh starts
    hits = cache.stats().near_hits
    assert [cache.get_or_load("k", _never) for _ in range(5)] == ["v1"] * 5
    assert cache.stats().near_hits == hits + 5  # the hit path again, while it runs
    release.set()
    wait_until(lambda: cache.get_or_load("k", _never) == "v2", 10, "the refreshed value")


def test_async_a_copy_whose_early_refresh_runs_is_served_by_the_hit_path(
    tmp_path: Path,
) -> None:
    clock = FakeClock()

    async def main() -> None:
        cache: AsyncCoalescingCache[str] = AsyncCoalescingCache(
            disk_store(tmp_path), ttl=10, beta=1.0, near_maxsize=10, clock=clock
        )

        async def slow_v1() -> str:
            clock.advance(2.0)
            return "v1"

        assert await cache.get_or_load("k", slow_v1) == "v1"
        assert await cache.get_or_load("k", _anever) == "v1"
        near = cache._near
        assert near is not None
        entry = near.entry(cache._key("k"), clock())
        assert entry is not None and entry.check_at < entry.fresh_until
        clock.set(entry.check_at)
        release = asyncio.Event()

        async def gated() -> str:
            await release.wait()
            return "v2"

        assert await cache.get_or_load("k", gated) == "v1"  # the refresh starts
        hits = cache.stats().near_hits
        for _ in range(5):
            assert await cache.get_or_load("k", _anever) == "v1"
        assert cache.stats().near_hits == hits + 5
        release.set()
        await async_wait_until(
            lambda: near.get(cache._key("k")) is None, 10, "the refresh's write to drop it"
        )
        assert await cache.get_or_load("k", _anever) == "v2"

    asyncio.run(main())
