"""The shared stores (diskcache, Redis) with the sync cache: behaviour, safety, failures.

Redis tests use a private server (tests/redis_fixtures.py), never the shared one.
"""

from __future__ import annotations

import asyncio
import builtins
import os
import re
import stat
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import diskcache
import pytest
import redis
import redis.asyncio

from stampede import BackendUnavailable, CoalescingCache, cached
from stampede._breaker import Breaker
from stampede.backends import DiskBackend, RedisBackend
from stampede.testing import FakeClock, Gate, wait_until
from tests.support.redis_server import RedisServer

from .helpers import disk_store, fork, in_thread, join_all, run_threads, wait_child


class NotFound(LookupError):
    pass


class Opaque:
    """Not data: only a pickling serializer can store it."""

    def __init__(self, n: int) -> None:
        self.n = n


Make = Callable[..., CoalescingCache[Any]]


@pytest.fixture(params=["disk", "redis"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Make]:
    """A factory of caches on one shared store, of each kind."""
    opened: list[Any] = []
    if request.param == "disk":
        folder = tmp_path / "cache"
        store: Any = diskcache.Cache(str(folder))
        os.chmod(folder, 0o700)
    else:
        url = request.getfixturevalue("redis_url")
        store = redis.Redis.from_url(url, socket_timeout=2)
    opened.append(store)

    def factory(**options: Any) -> CoalescingCache[Any]:
        return CoalescingCache(store, **options)

    factory.store = store  # type: ignore[attr-defined]
    yield factory
    for s in opened:
        s.close()


def raw_keys(make: Make) -> list[str]:
    store = make.store  # type: ignore[attr-defined]
    if isinstance(store, diskcache.Cache):
        return [k for k in store.iterkeys() if isinstance(k, str)]
    return [k.decode() for k in store.keys("*")]


def write_raw(make: Make, key: str, data: bytes, ttl: float = 60) -> None:
    store = make.store  # type: ignore[attr-defined]
    if isinstance(store, diskcache.Cache):
        store.set(key, data, expire=ttl)
    else:
        store.set(key, data, px=int(ttl * 1000))


def read_raw(make: Make, key: str) -> bytes:
    store = make.store  # type: ignore[attr-defined]
    data = store.get(key)
    assert isinstance(data, bytes)
    return data


# -- the core scenarios, on shared stores -------------------------------------------------


def test_miss_hit_and_types_survive(make: Make) -> None:
    cache = make(ttl=60)
    value = {"a": (1, 2.5), 3: {b"x", None}, "big": 2**100}
    assert cache.get_or_load("k", lambda: value) == value
    got = cache.get_or_load("k", lambda: "reloaded")
    assert got == value and type(got["a"]) is tuple
    s = cache.stats()
    assert (s.hits, s.misses, s.loads) == (1, 1, 1)


def test_expiry_follows_the_cache_clock(make: Make) -> None:
    clock = FakeClock()
    cache = make(ttl=10, beta=0, clock=clock)
    calls = iter(range(100))
    assert cache.get_or_load("k", lambda: next(calls)) == 0
    clock.advance(9.9)
    assert cache.get_or_load("k", lambda: next(calls)) == 0
    clock.advance(0.1)
    assert cache.get_or_load("k", lambda: next(calls)) == 1


def test_store_expires_what_nobody_may_serve(make: Make) -> None:
    cache = make(ttl=5, stale_ttl=7, namespace="n")
    cache.set("k", 1)
    (key,) = raw_keys(make)
    store = make.store  # type: ignore[attr-defined]
    if isinstance(store, diskcache.Cache):
        _, expire_time = store.get(key, expire_time=True)
        left = expire_time - time.time()
    else:
        left = store.pttl(key) / 1000
    assert 11 < left <= 12  # ttl + stale_ttl


def test_negative_entries_and_stale_values(make: Make) -> None:
    clock = FakeClock()
    cache = make(ttl=1, stale_ttl=30, beta=0, cache_errors=(LookupError,), clock=clock)

    def missing() -> str:
        raise NotFound("user 7")

    with pytest.raises(NotFound) as first:
        cache.get_or_load("gone", missing)
    with pytest.raises(NotFound) as again:
        cache.get_or_load("gone", lambda: "never")
    assert type(again.value) is NotFound and again.value.args == ("user 7",)
    assert again.value is not first.value
    cache.get_or_load("k", lambda: "old")
    clock.advance(2)
    assert cache.get_or_load("k", lambda: "new") == "old"  # stale, refreshing
    wait_until(lambda: cache.stats().loads == 2)
    assert cache.get_or_load("k", lambda: "x") == "new"


def test_invalidate_set_get_and_namespaces(make: Make) -> None:
    a = make(ttl=60, namespace="a")
    b = make(ttl=60, namespace="b")
    a.set("k", "A")
    b.set("k", "B")
    assert (a.get("k"), b.get("k")) == ("A", "B")
    a.invalidate("k")
    assert (a.get("k"), b.get("k")) == (None, "B")
    a.set("j", 1)
    a.clear()  # only namespace "a"
    assert a.get("j") is None and b.get("k") == "B"


def test_invalidate_during_load_is_fenced(make: Make) -> None:
    cache = make(ttl=60)
    gate = Gate("stale-load")
    got: list[str] = []
    t = threading.Thread(target=lambda: got.append(cache.get_or_load("k", gate)))
    t.start()
    assert gate.entered.wait(5)
    cache.invalidate("k")
    gate.open()
    join_all([t])
    assert got == ["stale-load"] and cache.get("k") is None
    assert cache.stats().fenced == 1


def test_cold_key_threads_load_once(make: Make) -> None:
    cache = make(ttl=60)
    gate = Gate("v")
    barrier = threading.Barrier(100)
    got: list[str] = []
    lock = threading.Lock()

    def caller() -> None:
        barrier.wait()
        v = cache.get_or_load("k", gate)
        with lock:
            got.append(v)

    threads = run_threads(100, caller)
    wait_until(lambda: cache.stats().coalesced + cache.stats().hits == 99)
    gate.open()
    join_all(threads)
    assert gate.calls == 1 and got == ["v"] * 100


def test_decorated_functions_on_one_store_keep_apart(make: Make) -> None:
    store = make.store  # type: ignore[attr-defined]

    @cached(cache=store, ttl=60)
    def f(x: int) -> str:
        return f"f{x}"

    @cached(cache=store, ttl=60)
    def g(x: int) -> str:
        return f"g{x}"

    assert (f(1), g(1), f(2)) == ("f1", "g1", "f2")
    f.cache_clear()
    assert len(raw_keys(make)) == 1  # g's entry stays
    assert g(1) == "g1" and g.cache_info().hits == 1


# -- what a store may hold: never trusted --------------------------------------------------


@pytest.mark.parametrize(
    "damage",
    ["garbage", "truncated", "flipped", "other key", "other serializer", "empty"],
)
def test_damaged_entries_are_counted_misses(make: Make, damage: str) -> None:
    cache = make(ttl=60)
    cache.set("k", {"v": 1})
    cache.set("other", {"v": 2})
    key, other = sorted(raw_keys(make), key=lambda k: "other" in k)
    good = read_raw(make, key)
    bad = {
        "garbage": b"\x80\x04K\x01.",  # a pickle: must never be unpickled
        "truncated": good[: len(good) // 2],
        "flipped": good[:-1] + bytes([good[-1] ^ 0xFF]),
        "other key": read_raw(make, other),
        "other serializer": good.replace(b"data2", b"data9"),
        "empty": b"",
    }[damage]
    write_raw(make, key, bad)
    assert cache.get_or_load("k", lambda: "reloaded") == "reloaded"
    assert cache.stats().serialization_errors == 1
    assert cache.get_or_load("k", lambda: "again") == "reloaded"  # rewritten, readable


def test_unserializable_value_is_returned_not_cached(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    cache = make(ttl=60)

    class Opaque:
        pass

    thing = Opaque()
    assert cache.get_or_load("k", lambda: thing) is thing
    assert cache.get("k") is None
    assert cache.stats().serialization_errors == 1
    assert "serializer" in caplog.text


def test_value_over_the_size_limit_is_returned_not_cached(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    store = DiskBackend(str(folder), max_value_size=1000)
    cache: CoalescingCache[bytes] = CoalescingCache(store, ttl=60)
    big = b"x" * 5000
    assert cache.get_or_load("k", lambda: big) == big
    assert cache.get("k") is None and cache.stats().serialization_errors == 1
    assert cache.get_or_load("small", lambda: b"y") == b"y" and cache.get("small") == b"y"


def test_negative_entry_of_an_unlisted_type_is_a_miss(make: Make) -> None:
    writer = make(ttl=60, cache_errors=(NotFound,))
    reader = make(ttl=60, cache_errors=(KeyError,))  # does not list NotFound

    def fail() -> str:
        raise NotFound("x")

    with pytest.raises(NotFound):
        writer.get_or_load("k", fail)
    assert reader.get_or_load("k", lambda: "loaded") == "loaded"


def test_negative_entries_of_a_subclass_resolve_once(tmp_path: Path) -> None:
    """The type of a negative entry read from a shared store is resolved once, then reused.

    Regression test for c5b4412 (Errors that cannot be rebuilt from their args are not
    negative-cached; the type of a negative entry read from a shared store is resolved once).
    """
    from stampede import _envelope

    class Gone(NotFound):
        pass

    store = disk_store(tmp_path)
    cache: CoalescingCache[str] = CoalescingCache(store, ttl=60, cache_errors=(Exception,))

    def load() -> str:
        raise Gone("x")

    for _ in range(3):
        with pytest.raises(Gone):
            cache.get_or_load("k", load)
    assert any(t is Gone for t in _envelope._resolved.values())
    assert cache.stats().negative_hits == 2


@pytest.mark.skipif(sys.version_info < (3, 11), reason="ExceptionGroup is new in Python 3.11")
@pytest.mark.parametrize("distributed", [False, True], ids=["plain", "distributed"])
@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("kind", ["disk", "redis"])
def test_a_planted_error_that_cannot_be_rebuilt_is_a_counted_miss(
    kind: str, flavour: str, distributed: bool, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A foreign negative entry naming a type its args cannot rebuild (ExceptionGroup
    wants a non-empty list of exceptions) is a counted miss on every read path.

    Before the fix, get_or_load raised TypeError (rebuilding the error to raise it)
    on the plain read and on the read alongside a lease, sync and async.
    """
    import math

    from stampede import AsyncCoalescingCache
    from stampede._entry import MISSING, Entry, ErrorData

    if kind == "disk":
        sync_store: Any = disk_store(tmp_path)
        read_store: Any = sync_store
    else:
        url = request.getfixturevalue("redis_url")
        sync_store = redis.Redis.from_url(url)
        read_store = redis.asyncio.Redis.from_url(url) if flavour == "async" else sync_store
    errors = (Exception,)
    writer: CoalescingCache[str] = CoalescingCache(sync_store, ttl=60, cache_errors=errors)

    def plant() -> None:
        now = writer._clock()
        error = ErrorData(builtins.ExceptionGroup, ("boom", []))
        assert not error.rebuildable()
        entry = Entry(MISSING, error, now + 60, now + 60, 0.0, -math.inf)
        writer.backend.set(writer._key("k"), entry)  # as a foreign writer could

    options: dict[str, Any] = {"ttl": 60, "cache_errors": errors, "distributed": distributed}
    reads = 2 if distributed else 1  # distributed: the plain read, then the one with the lease

    def check_sync() -> None:
        cache: CoalescingCache[str] = CoalescingCache(read_store, **options)
        plant()
        assert cache.get_or_load("k", lambda: "loaded") == "loaded"
        assert cache.stats().serialization_errors == reads
        assert cache.get("k") == "loaded"
        plant()
        assert cache.get("k") is None and cache.stats().serialization_errors == reads + 1

    async def check_async() -> None:
        cache: AsyncCoalescingCache[str] = AsyncCoalescingCache(read_store, **options)

        async def load() -> str:
            return "loaded"

        plant()
        assert await cache.get_or_load("k", load) == "loaded"
        assert cache.stats().serialization_errors == reads
        assert await cache.get("k") == "loaded"
        plant()
        assert await cache.get("k") is None and cache.stats().serialization_errors == reads + 1
        if read_store is not sync_store:
            await read_store.aclose()

    if flavour == "sync":
        check_sync()
    else:
        asyncio.run(check_async())
    sync_store.close()


@pytest.mark.parametrize("distributed", [False, True], ids=["plain", "distributed"])
@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("kind", ["disk", "redis"])
def test_a_planted_giant_is_a_counted_miss_never_fetched(
    kind: str, flavour: str, distributed: bool, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The audit's read amplification: a valid envelope of many tiny containers
    (``[set(), set(), ...]``, two bytes each) larger than the reader's
    ``max_value_size``, planted by a writer that allows it, is refused by its length
    inside the store's read (Lua STRLEN, SQLite's length() or fstat), on the plain
    read and the read alongside a lease, sync and async: a counted miss, and the
    reader allocates a fraction of the planted size. Before the fix, every reader
    fetched and decoded it in full.
    """
    import tracemalloc

    from stampede import AsyncCoalescingCache
    from stampede.backends import AsyncRedisBackend

    limit = 16 * 1024
    if kind == "disk":
        folder = tmp_path / "cache"
        planter: Any = DiskBackend(str(folder), max_value_size=1 << 22)
        reader: Any = DiskBackend(str(folder), max_value_size=limit)
    else:
        url = request.getfixturevalue("redis_url")
        planter = RedisBackend(redis.Redis.from_url(url), max_value_size=1 << 22)
        if flavour == "async":
            reader = AsyncRedisBackend(redis.asyncio.Redis.from_url(url), max_value_size=limit)
        else:
            reader = RedisBackend(redis.Redis.from_url(url), max_value_size=limit)
    writer: CoalescingCache[Any] = CoalescingCache(planter, ttl=60)
    writer.set("k", [set()] * 600_000)  # 1.2 MB, 70 times the reader's limit
    planted = planter._get_raw(writer._key("k"))[0]
    assert isinstance(planted, bytes) and len(planted) > 4 * limit

    options: dict[str, Any] = {"ttl": 60, "distributed": distributed}
    reads = 2 if distributed else 1  # distributed: the plain read, then the one with the lease

    def traced(read: Callable[[], object]) -> int:
        """What ``read`` allocated at its peak."""
        tracemalloc.start()
        try:
            assert read() == "small"
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    if flavour == "sync":
        cache: CoalescingCache[Any] = CoalescingCache(reader, **options)
        cache.get("warm-up")  # the store's connection, made untraced
        peak = traced(lambda: cache.get_or_load("k", lambda: "small"))
        stats = cache.stats()
        assert cache.get("k") == "small"
    else:

        async def read() -> tuple[Any, int]:
            acache: AsyncCoalescingCache[Any] = AsyncCoalescingCache(reader, **options)

            async def load() -> str:
                return "small"

            await acache.get("warm-up")  # the client's connection, made untraced
            tracemalloc.start()
            try:
                assert await acache.get_or_load("k", load) == "small"
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert await acache.get("k") == "small"
            return acache.stats(), peak

        stats, peak = asyncio.run(read())
    assert peak < len(planted) // 2, f"the read allocated {peak:,} bytes"  # a fetch: all of it
    assert (stats.serialization_errors, stats.loads) == (reads, 1)


def _command_calls(client: redis.Redis) -> dict[str, int]:
    """Calls per command so far on the server (``INFO commandstats``)."""
    stats: Any = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def _sent(client: redis.Redis, before: dict[str, int]) -> dict[str, int]:
    after = _command_calls(client)
    sent = {name: n - before.get(name, 0) for name, n in after.items()}
    return {name: n for name, n in sent.items() if n and name not in ("info",)}


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_redis_hit_is_getrange_and_pttl_and_a_long_entry_a_second_trip(
    redis_url: str, redis_client: redis.Redis, flavour: str
) -> None:
    """A hit sends ``GETRANGE`` of the entry's first bytes and ``PTTL``, pipelined
    (one round trip, no script); an entry longer than that prefix is read whole by
    the read script, in a second round trip, and comes back intact."""
    from stampede import AsyncCoalescingCache
    from stampede.backends.redis import _prefix

    limit = 16 * 1024
    prefix = _prefix(limit)  # an eighth of the limit: 2 KiB
    small, long = "s" * 10, "L" * (4 * prefix)  # long: between the prefix and the limit

    def check(sent: dict[str, int], hits: int, long_hits: int) -> None:
        assert sent.get("getrange", 0) == hits
        if not long_hits:  # nothing else: no script, no GET
            assert sent == {"getrange": hits, "pttl": hits}
        else:  # the script's own commands count too (and a first NOSCRIPT, if any)
            assert sent.get("evalsha", 0) >= long_hits and sent.get("get", 0) == long_hits

    if flavour == "sync":
        store = RedisBackend(redis.Redis.from_url(redis_url), max_value_size=limit)
        cache: CoalescingCache[str] = CoalescingCache(store, ttl=60, namespace="trip")
        cache.set("small", small)
        cache.set("long", long)
        before = _command_calls(redis_client)
        assert [cache.get_or_load("small", _never) for _ in range(5)] == [small] * 5
        check(_sent(redis_client, before), 5, 0)
        before = _command_calls(redis_client)
        assert [cache.get_or_load("long", _never) for _ in range(3)] == [long] * 3
        check(_sent(redis_client, before), 3, 3)
        assert cache.stats().hits == 8
        return

    async def run() -> None:
        from stampede.backends import AsyncRedisBackend

        astore = AsyncRedisBackend(redis.asyncio.Redis.from_url(redis_url), max_value_size=limit)
        acache: AsyncCoalescingCache[str] = AsyncCoalescingCache(astore, ttl=60, namespace="atrip")
        await acache.set("small", small)
        await acache.set("long", long)
        before = _command_calls(redis_client)
        assert [await acache.get_or_load("small", _anever) for _ in range(5)] == [small] * 5
        check(_sent(redis_client, before), 5, 0)
        before = _command_calls(redis_client)
        assert [await acache.get_or_load("long", _anever) for _ in range(3)] == [long] * 3
        check(_sent(redis_client, before), 3, 3)
        assert acache.stats().hits == 8

    asyncio.run(run())


def test_a_non_string_under_a_redis_key_is_a_foreign_entry(redis_url: str) -> None:
    """A Redis key holding a non-string (WRONGTYPE) is a counted foreign entry, not a store error.

    Regression test for 3a21f4a (Review fixes: Redis: WRONGTYPE is a foreign entry).
    """
    client = redis.Redis.from_url(redis_url)
    cache: CoalescingCache[str] = CoalescingCache(client, ttl=60, on_backend_error="raise")
    for name in "abc":
        client.rpush(cache._key(name), "x")  # type: ignore[arg-type]
        assert cache.get_or_load(name, lambda: "loaded") == "loaded"
    s = cache.stats()
    assert s.serialization_errors == 3 and s.backend_errors == 0
    assert cache.get_or_load("d", lambda: "d") == "d" and cache.get("d") == "d"


# -- other processes ---------------------------------------------------------------------

_CHILD = """
import sys
import stampede
from tests.test_backends import NotFound
import redis, diskcache
kind, where = sys.argv[1], sys.argv[2]
store = redis.Redis.from_url(where) if kind == "redis" else diskcache.Cache(where)
cache = stampede.CoalescingCache(store, ttl=60, cache_errors=(NotFound,))
print(cache.get_or_load("shared", lambda: "from-child"))
def fail():
    raise NotFound("nope", 7)
try:
    cache.get_or_load("neg", fail)
except NotFound:
    print("raised")
"""


def test_another_process_reads_what_this_one_wrote(make: Make) -> None:
    cache = make(ttl=60, cache_errors=(NotFound,))
    cache.set("shared", "from-parent")
    store = make.store  # type: ignore[attr-defined]
    if isinstance(store, diskcache.Cache):
        kind, where = "disk", store.directory
    else:
        kind = "redis"
        kw = store.connection_pool.connection_kwargs
        where = f"redis://{kw['host']}:{kw['port']}/0"
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, kind, where],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["from-parent", "raised"]
    # The child's negative entry, read here: the same type, the same args, no load.
    with pytest.raises(NotFound) as exc:
        cache.get_or_load("neg", lambda: "should not load")
    assert exc.value.args == ("nope", 7)


# -- failures ------------------------------------------------------------------------------


def test_redis_down_fails_open_then_recovers(fresh_redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(
        fresh_redis_server.url, socket_timeout=0.3, socket_connect_timeout=0.3, retry=None
    )
    store = RedisBackend(client, failure_threshold=2, cooldown=0.2)
    cache: CoalescingCache[str] = CoalescingCache(store, ttl=60)
    assert cache.get_or_load("k", lambda: "v1") == "v1"
    fresh_redis_server.kill()
    loads = iter(range(100))
    started = time.monotonic()
    for _ in range(20):
        assert cache.get_or_load("k", lambda: f"local{next(loads)}").startswith("local")
    assert time.monotonic() - started < 5  # the breaker: no timeout paid per call
    assert cache.stats().backend_errors >= 20
    fresh_redis_server.restart()

    def recovered() -> bool:
        cache.get_or_load("probe", lambda: "p")
        return cache.get("probe") == "p"

    wait_until(recovered, deadline=10, what="the breaker to close again")
    assert cache.get_or_load("k", lambda: "v2") == "v2"
    assert cache.get("k") == "v2"


def test_paused_redis_costs_timeouts_only_until_the_breaker_opens(
    fresh_redis_server: RedisServer,
) -> None:
    client = redis.Redis.from_url(fresh_redis_server.url, socket_timeout=0.2, retry=None)
    cache: CoalescingCache[int] = CoalescingCache(
        RedisBackend(client, failure_threshold=2, cooldown=30), ttl=60
    )
    with fresh_redis_server.paused():
        times = []
        for i in range(8):
            t = time.monotonic()
            assert cache.get_or_load(f"k{i}", lambda i=i: i) == i
            times.append(time.monotonic() - t)
    assert max(times[-4:]) < 0.15  # open: fail at once, not after the 0.2 s timeout
    assert sum(times) < 3


def _never() -> str:
    raise AssertionError("a hit must not load")


async def _anever() -> str:
    raise AssertionError("a hit must not load")


def _unpause(server: RedisServer) -> None:
    with redis.Redis.from_url(server.url) as admin:  # served during a write pause
        admin.execute_command("CLIENT", "UNPAUSE")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("distributed", [False, True], ids=["plain", "distributed"])
def test_hits_go_on_during_a_client_pause_write(
    fresh_redis_server: RedisServer, distributed: bool, flavour: str
) -> None:
    """A failover (``FAILOVER``, or an operator's ``CLIENT PAUSE ... WRITE``) holds
    writes only: hits keep coming from Redis, nothing is counted as a store error,
    the breaker stays closed. The read script is flagged ``no-writes``; before, Redis
    held it like any script and every hit timed out, reloaded and opened the breaker.
    A miss's write waits out the client's timeout and fails open (the caller gets
    the loaded value)."""
    from stampede import AsyncCoalescingCache

    server = fresh_redis_server
    options: dict[str, Any] = {"ttl": 60, "distributed": distributed}
    if flavour == "sync":
        cache: CoalescingCache[str] = CoalescingCache(
            redis.Redis.from_url(server.url, socket_timeout=1), **options
        )
        cache.set("k", "v")
        server.client_pause(20_000, write_only=True)
        try:
            assert [cache.get_or_load("k", _never) for _ in range(20)] == ["v"] * 20
            s = cache.stats()
            assert (s.hits, s.backend_errors) == (20, 0)
            assert cache.get_or_load("new", lambda: "loaded") == "loaded"  # its write fails open
            assert cache.stats().backend_errors >= 1
        finally:
            _unpause(server)
        return

    async def run() -> None:
        client = redis.asyncio.Redis.from_url(server.url, socket_timeout=1)
        acache: AsyncCoalescingCache[str] = AsyncCoalescingCache(client, **options)
        await acache.set("k", "v")
        server.client_pause(20_000, write_only=True)
        try:
            got = [await acache.get_or_load("k", _anever) for _ in range(20)]
            assert got == ["v"] * 20
            s = acache.stats()
            assert (s.hits, s.backend_errors) == (20, 0)
        finally:
            _unpause(server)
            await client.aclose()

    asyncio.run(run())


@pytest.mark.timeout(30)
@pytest.mark.parametrize("distributed", [False, True], ids=["plain", "distributed"])
def test_a_client_pause_all_fails_open_then_recovers(
    fresh_redis_server: RedisServer, distributed: bool
) -> None:
    """``CLIENT PAUSE ... ALL`` holds every command: each call waits out the client's
    timeout at most until the breaker opens, callers get the origin's value, and the
    cache reads Redis again once the pause ends and the cooldown has passed (a
    load's write that reached Redis as the pause ended may have replaced the value:
    any of them is the origin's)."""
    server = fresh_redis_server
    client = redis.Redis.from_url(server.url, socket_timeout=0.3)
    store = RedisBackend(client, failure_threshold=2, cooldown=0.5)
    cache: CoalescingCache[int] = CoalescingCache(store, ttl=60, distributed=distributed)
    cache.set("k", 0)
    server.client_pause(3_000)  # held until it ends: CLIENT UNPAUSE would be held too
    assert [cache.get_or_load("k", lambda: 1) for _ in range(6)] == [1] * 6
    s = cache.stats()
    assert s.backend_errors >= 2 and store.breaker.is_open

    def read_again() -> bool:  # a hit: Redis answered
        hits = cache.stats().hits
        return cache.get_or_load("k", lambda: 2) in (0, 1, 2) and cache.stats().hits > hits

    wait_until(read_again, 10, "Redis read again")
    assert not store.breaker.is_open


def test_raise_mode_gives_backend_unavailable(fresh_redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(fresh_redis_server.url, socket_timeout=0.3, retry=None)
    cache: CoalescingCache[int] = CoalescingCache(client, ttl=60, on_backend_error="raise")
    fresh_redis_server.kill()
    with pytest.raises(BackendUnavailable) as exc:
        cache.get_or_load("k", lambda: 1)
    assert isinstance(exc.value.__cause__, redis.RedisError | OSError)


def test_breaker_judges_only_the_store() -> None:
    """A cancelled probe says nothing of the store; a probe that never came back is replaced.

    Regression test for 3a21f4a (Review fixes: breaker: client pool exhaustion and
    cancellation judge nothing, a lost probe is replaced).
    """
    clock = FakeClock()
    breaker = Breaker(threshold=1, cooldown=5, clock=clock)
    breaker.failure()
    assert not breaker.allow()
    clock.advance(5)
    assert breaker.allow()  # the probe
    breaker.release()  # it was cancelled: says nothing of the store
    assert breaker.is_open and breaker.allow()  # still open; a new probe may go
    assert not breaker.allow()  # ... one at a time
    clock.advance(5)
    assert breaker.allow()  # a probe that never came back is replaced
    breaker.success()
    assert not breaker.is_open


def test_decode_responses_client_is_refused(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses"):
        CoalescingCache(client)


def test_redis_urls(redis_url: str) -> None:
    cache: CoalescingCache[int] = CoalescingCache(redis_url, ttl=60)
    assert cache.get_or_load("k", lambda: 5) == 5 and cache.get("k") == 5


# -- disk folders ------------------------------------------------------------------------


def test_disk_url_creates_an_owner_only_folder(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "cache"
    cache: CoalescingCache[int] = CoalescingCache(f"disk://{folder}", ttl=60)
    assert cache.get_or_load("k", lambda: 1) == 1
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700


def test_group_writable_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    os.chmod(folder, 0o777)
    with pytest.raises(PermissionError, match="writable by group or others"):
        CoalescingCache(f"disk://{folder}")
    with pytest.raises(PermissionError):
        CoalescingCache(diskcache.Cache(str(folder)))


def test_bad_urls() -> None:
    with pytest.raises(ValueError, match="three slashes"):
        CoalescingCache("disk://host/path")
    with pytest.raises(ValueError, match="unsupported"):
        CoalescingCache("memcached://x")


# -- asyncio --------------------------------------------------------------------------------


def test_client_flavours_must_match_the_cache(redis_url: str) -> None:
    from stampede import AsyncCoalescingCache

    with pytest.raises(TypeError, match=r"redis\.asyncio"):
        AsyncCoalescingCache(redis.Redis.from_url(redis_url))
    with pytest.raises(TypeError, match="asyncio-only"):
        CoalescingCache(redis.asyncio.Redis.from_url(redis_url))


@pytest.mark.parametrize("kind", ["disk", "redis"])
def test_async_cold_key_tasks_load_once_and_cancellation(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    import asyncio

    from stampede import AsyncCoalescingCache
    from stampede.testing import AsyncGate, async_wait_until

    async def main() -> None:
        if kind == "disk":
            folder = tmp_path / "c"
            store: Any = diskcache.Cache(str(folder))
            os.chmod(folder, 0o700)
        else:
            store = redis.asyncio.Redis.from_url(request.getfixturevalue("redis_url"))
        cache: AsyncCoalescingCache[str] = AsyncCoalescingCache(store, ttl=60)
        gate = AsyncGate("v")
        tasks = [asyncio.ensure_future(cache.get_or_load("k", gate)) for _ in range(500)]
        await async_wait_until(lambda: cache.stats().coalesced == 499)
        tasks[0].cancel()  # the first caller leaves; the load goes on for the others
        gate.open()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[0], asyncio.CancelledError)
        assert results[1:] == ["v"] * 499 and gate.calls == 1
        assert await cache.get("k") == "v"
        await cache.invalidate("k")
        assert await cache.get("k") is None
        if kind == "redis":
            await store.aclose()
        else:
            store.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_async_redis_down_fails_open(fresh_redis_server: RedisServer) -> None:
    import asyncio

    from stampede import AsyncCoalescingCache
    from stampede.backends import AsyncRedisBackend

    async def main() -> None:
        client = redis.asyncio.Redis.from_url(
            fresh_redis_server.url, socket_timeout=0.3, socket_connect_timeout=0.3, retry=None
        )
        cache: AsyncCoalescingCache[str] = AsyncCoalescingCache(
            AsyncRedisBackend(client, failure_threshold=2, cooldown=60), ttl=60
        )
        assert await cache.get_or_load("k", lambda: "v1") == "v1"
        fresh_redis_server.kill()
        started = time.monotonic()
        for i in range(10):
            assert await cache.get_or_load(f"k{i}", lambda i=i: f"local{i}") == f"local{i}"
        assert time.monotonic() - started < 5
        assert cache.stats().backend_errors >= 10
        raising: AsyncCoalescingCache[str] = AsyncCoalescingCache(
            client, ttl=60, on_backend_error="raise"
        )
        with pytest.raises(BackendUnavailable):
            await raising.get_or_load("k", lambda: "x")
        await client.aclose()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_async_clear_on_a_remote_store_fences_a_commit() -> None:
    """An async clear() on a shared store waits for a commit already writing: the
    value it writes does not outlive the clear.

    Regression test for 3a21f4a (Review fixes: cache_clear and async clear fence
    in-flight loads): clear() took no fencing lock, so a commit suspended in its
    store write landed after the clear.
    """
    import asyncio
    import threading

    from stampede import AsyncCoalescingCache
    from stampede.testing import async_wait_until
    from tests.support.fake_leases import DictLeaseStore

    writing, release = threading.Event(), threading.Event()

    class SlowWrites(DictLeaseStore):
        def _set_raw(self, key: str, data: bytes, ttl: float) -> None:
            writing.set()
            release.wait(10)
            super()._set_raw(key, data, ttl)

    async def main() -> None:
        cache: AsyncCoalescingCache[str] = AsyncCoalescingCache(SlowWrites(), ttl=60)
        task = asyncio.ensure_future(cache.get_or_load("k", lambda: "old"))
        await async_wait_until(writing.is_set, what="the commit is writing")
        clearing = asyncio.ensure_future(cache.clear())
        # clear() must wait for the write in progress (a bounded wait, not ordering:
        # the bug let it finish at once, before the write landed).
        done, _ = await asyncio.wait({clearing}, timeout=0.2)
        assert not done, "clear() did not wait for the commit that was writing"
        release.set()
        assert await task == "old"
        await asyncio.wait_for(clearing, 10)
        assert await cache.get("k") is None

    asyncio.run(main())

def test_redis_down_at_start_still_serves(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a loopback port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache: CoalescingCache[int] = CoalescingCache(f"redis://127.0.0.1:{port}/0", ttl=60)
    assert cache.get_or_load("k", lambda: 1) == 1
    assert cache.get_or_load("k", lambda: 2) == 2  # nothing cached: each call loads
    assert cache.stats().backend_errors >= 2


def test_redis_killed_mid_flight_every_caller_gets_the_value(
    fresh_redis_server: RedisServer,
) -> None:
    client = redis.Redis.from_url(
        fresh_redis_server.url, socket_timeout=0.5, socket_connect_timeout=0.5, retry=None
    )
    cache: CoalescingCache[str] = CoalescingCache(client, ttl=60)
    gate = Gate("v")
    got: list[str] = []
    lock = threading.Lock()

    def caller() -> None:
        v = cache.get_or_load("k", gate)
        with lock:
            got.append(v)

    threads = run_threads(20, caller)
    wait_until(lambda: cache.stats().coalesced == 19)
    fresh_redis_server.kill()  # the leader's write will fail
    gate.open()
    join_all(threads)
    assert got == ["v"] * 20 and gate.calls == 1
    assert cache.stats().backend_errors >= 1


def test_slow_redis_times_out_and_fails_open(fresh_redis_server: RedisServer) -> None:
    if not fresh_redis_server.debug_command_enabled:
        pytest.skip("this server has no DEBUG command")
    client = redis.Redis.from_url(fresh_redis_server.url, socket_timeout=0.2, retry=None)
    cache: CoalescingCache[str] = CoalescingCache(client, ttl=60)
    cache.set("k", "cached")
    slow = redis.Redis.from_url(fresh_redis_server.url, socket_timeout=10)
    sleeper = threading.Thread(target=lambda: slow.execute_command("DEBUG", "SLEEP", "3"))
    sleeper.start()
    wait_until(lambda: _is_sleeping(fresh_redis_server), deadline=5)
    started = time.monotonic()
    assert cache.get_or_load("k", lambda: "loaded while redis was slow") == (
        "loaded while redis was slow"
    )
    assert time.monotonic() - started < 2.5  # bounded by the socket timeouts, not the sleep
    sleeper.join(10)
    slow.close()


def _is_sleeping(server: RedisServer) -> bool:
    probe = redis.Redis.from_url(server.url, socket_timeout=0.05, retry=None)
    try:
        probe.ping()
        return False
    except redis.TimeoutError:
        return True
    finally:
        probe.close()


def test_signed_pickle_end_to_end_and_tampering(make: Make) -> None:
    from stampede.serializers import PickleSerializer

    cache = make(ttl=60, serializer=PickleSerializer(secret=b"k1"))
    assert cache.get_or_load("k", lambda: Opaque(1)).n == 1
    (key,) = raw_keys(make)
    data = bytearray(read_raw(make, key))
    data[-10] ^= 0x01  # inside the signed payload (the CRC is re-made by the attacker)
    import struct
    import zlib

    body = bytes(data[:-4])
    write_raw(make, key, body + struct.pack("<I", zlib.crc32(body)))
    assert cache.get_or_load("k", lambda: Opaque(2)).n == 2  # refused, reloaded
    assert cache.stats().serialization_errors == 1
    rotated = make(ttl=60, serializer=PickleSerializer(secret=b"k2", verify=[b"k1"]))
    assert rotated.get("k").n == 2  # signed with the old key: still read
    other = make(ttl=60, serializer=PickleSerializer(secret=b"other"))
    assert other.get("k") is None and other.stats().serialization_errors == 1


# -- regressions ------------------------------------------------------------------------------


def test_error_types_defined_in_a_function_are_cached(make: Make) -> None:
    class Gone(LookupError):
        pass

    calls = 0

    def load() -> str:
        nonlocal calls
        calls += 1
        raise Gone("user 7")

    cache = make(ttl=60, cache_errors=(Gone,), error_ttl=30)
    for _ in range(3):
        with pytest.raises(Gone):
            cache.get_or_load("k", load)
    assert calls == 1 and cache.stats().serialization_errors == 0


class _Tick:
    """The smallest clock object: new ones tend to land at dead ones' addresses."""

    def __call__(self) -> float:
        return 0.0


def test_clock_domains_are_random_tokens_that_die_with_their_clock() -> None:
    """A domain must not be derived from id(): a new clock may reuse a dead one's address."""
    import gc

    from stampede import _envelope

    gc.collect()
    before = len(_envelope._domains)
    clock = _Tick()
    domain = _envelope.clock_domain(clock)
    assert _envelope.clock_domain(clock) == domain  # stable while it lives
    assert clock in _envelope._domains
    ref = weakref.ref(clock)
    del clock
    gc.collect()
    assert ref() is None and len(_envelope._domains) == before  # its token is gone
    newcomers = [_Tick() for _ in range(1000)]  # (often one at the dead address)
    domains = {_envelope.clock_domain(c) for c in newcomers}
    assert domain not in domains and len(domains) == 1000


def test_memory_clear_drops_only_its_namespace() -> None:
    store: dict[Any, Any] = {}
    a: CoalescingCache[int] = CoalescingCache(store, namespace="a")
    b: CoalescingCache[int] = CoalescingCache(store, namespace="b")
    plain: CoalescingCache[int] = CoalescingCache(store)
    for c in (a, b, plain):
        c.set("k", 1)
    a.clear()
    assert (a.get("k"), b.get("k"), plain.get("k")) == (None, 1, 1)
    plain.clear()
    assert (b.get("k"), plain.get("k")) == (1, None)


def test_redis_clear_stays_in_its_namespace(redis_url: str) -> None:
    """clear() on Redis drops its own namespace only, whatever user text looks like.

    Regression test for 3a21f4a (Review fixes: Redis: ... SCAN pattern exact).
    """
    client = redis.Redis.from_url(redis_url)
    x: CoalescingCache[str] = CoalescingCache(client, namespace="x")
    x.set("}:1:a:v1:", "precious")  # user text that looks like another namespace's keys
    CoalescingCache(client, namespace="a").clear()
    assert x.get("}:1:a:v1:") == "precious"


# -- the disk store never unpickles what it finds ------------------------------------------


_MARK = "STAMPEDE_PWNED"


class _Exploit:
    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"import os; os.environ[{_MARK!r}] = '1'",))


def test_a_pickled_row_in_the_disk_store_is_never_unpickled(tmp_path: Path) -> None:
    import pickle
    import sqlite3

    folder = tmp_path / "c"
    cache: CoalescingCache[bytes] = CoalescingCache(f"disk://{folder}", namespace="n")
    cache.set("k", b"v")
    key = cache._key("k")
    with sqlite3.connect(folder / "cache.db") as db:  # what an attacker with write access does
        db.execute(
            "UPDATE Cache SET mode = 4, value = ? WHERE key = ?",
            (pickle.dumps(_Exploit()), key),
        )
    os.environ.pop(_MARK, None)
    assert cache.get_or_load("k", lambda: b"reloaded") == b"reloaded"
    assert _MARK not in os.environ
    assert cache.stats().serialization_errors == 1
    cache.clear()  # clearing does not unpickle keys either
    assert _MARK not in os.environ


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs chown")
def test_a_folder_of_another_user_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "theirs"
    folder.mkdir(mode=0o755)
    os.chown(folder, 65534, 65534)
    with pytest.raises(PermissionError, match="another user"):
        CoalescingCache(f"disk://{folder}")


# The whole path to a folder is checked, not only the folder (an outside audit:
# a symlink or a parent others can change let them repoint a running cache).


def test_a_symlinked_folder_is_read_where_the_link_led_when_opened(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(mode=0o700)
    second.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(first)
    cache: CoalescingCache[str] = CoalescingCache(f"disk://{link}", ttl=60, namespace="n")
    cache.set("k", "first")
    link.unlink()
    link.symlink_to(second)  # repointed: a new thread must still read the first folder
    seen: list[str | None] = []
    reader = threading.Thread(target=lambda: seen.append(cache.get("k")))
    reader.start()
    join_all([reader])
    assert seen == ["first"]
    assert not any(second.iterdir())
    backend: Any = cache._backend
    assert backend.cache.directory == str(first)  # diskcache got the resolved path


def test_a_parent_writable_by_others_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "open"
    parent.mkdir()
    os.chmod(parent, 0o777)  # no sticky bit: anyone may rename "cache" away
    (parent / "cache").mkdir(mode=0o700)
    with pytest.raises(PermissionError, match="writable by group or others") as refused:
        CoalescingCache(f"disk://{parent / 'cache'}")
    assert repr(str(parent)) in str(refused.value)
    with pytest.raises(PermissionError, match=re.escape(repr(str(parent)))):
        CoalescingCache(f"disk://{parent / 'new'}")  # nor made there


def test_a_sticky_parent_like_tmp_is_accepted(tmp_path: Path) -> None:
    parent = tmp_path / "sticky"
    parent.mkdir()
    os.chmod(parent, 0o1777)
    cache: CoalescingCache[int] = CoalescingCache(f"disk://{parent / 'cache'}", ttl=60)
    assert cache.get_or_load("k", lambda: 1) == 1


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs chown")
def test_a_symlink_of_another_user_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(folder)
    os.lchown(link, 65534, 65534)  # as if "nobody" made it: they could repoint it
    with pytest.raises(PermissionError, match=r"symlink .* another user"):
        CoalescingCache(f"disk://{link}")
    store = diskcache.Cache(str(link))  # a cache opened by the user: checked the same way
    with pytest.raises(PermissionError, match="symlink"):
        CoalescingCache(store)
    store.close()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs chown")
def test_a_parent_of_another_user_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "theirs"
    parent.mkdir(mode=0o755)
    (parent / "cache").mkdir(mode=0o700)
    os.chown(parent, 65534, 65534)  # they may not write "cache", but may rename it
    with pytest.raises(PermissionError, match="another user"):
        CoalescingCache(f"disk://{parent / 'cache'}")


# -- fork ---------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_during_a_disk_write_fails_fast_instead_of_hanging(
    tmp_path: Path,
) -> None:
    """SQLite keeps a process's locks in process memory: a child forked while
    another thread wrote inherits that write lock, held for good by a
    connection no thread of the child can close (an outside audit: the
    child's first write waited the busy timeout, diskcache's 60 s). The
    store is then unavailable in the child, at once and saying why."""
    folder = tmp_path / "c"
    folder.mkdir(mode=0o700)
    # Before the fix the child's write waited this busy timeout (diskcache's
    # default is 60 s), then failed; 3 s makes that run fail in seconds.
    store = diskcache.Cache(str(folder), timeout=3)
    cache: CoalescingCache[str] = CoalescingCache(store, ttl=60, namespace="n")
    strict: CoalescingCache[str] = CoalescingCache(
        store, ttl=60, namespace="n", on_backend_error="raise"
    )
    cache.set("before", "x")
    writing, release = threading.Event(), threading.Event()

    def writer() -> None:
        with store.transact():  # the user's own transaction, in another thread
            store.set("other", b"y")
            writing.set()
            release.wait(30)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    assert writing.wait(5)
    pid = fork()  # with threads running
    if pid == 0:  # the child: the writer thread does not exist here, its lock does
        code = 1
        try:
            start = time.monotonic()
            code = 2
            assert cache.get_or_load("k", lambda: "child") == "child"  # fails open
            assert time.monotonic() - start < 2.5, "the child waited the busy timeout"
            code = 3
            try:
                strict.set("k", "child")
            except BackendUnavailable as exc:
                assert "fork" in str(exc), exc
            else:
                raise AssertionError("the store must refuse")
            code = 4
            with pytest.raises(BackendUnavailable, match="fork"):
                CoalescingCache(f"disk://{folder}")  # a new cache on the folder too
            code = 0
        finally:
            os._exit(code)
    code = wait_child(pid, 20, "the child hung on its parent's write lock")
    release.set()
    join_all([t])
    assert code == 0
    assert store.get("other") == b"y"  # the parent's transaction went on
    assert cache.get_or_load("k", lambda: "parent") == "parent"  # the parent is unaffected


@pytest.mark.timeout(60)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_during_a_flight_loads_at_once(make: Make) -> None:
    """A thread of the parent leads a load of "k" (its loader blocked) when the
    process forks: that leader does not exist in the child, so the child's
    get_or_load of "k", and of another key, must not wait for its flight. The
    child loads and stores (no thread of the parent was writing: the folder is
    usable there); the parent's flight then ends and stores as if nothing happened."""
    cache = make(ttl=60)
    gate = Gate("parent")
    leader, out = in_thread(lambda: cache.get_or_load("k", gate))
    assert gate.entered.wait(10)  # the parent's thread leads "k", its loader blocked
    pid = fork()  # with threads running
    if pid == 0:  # the child
        code = 1
        try:
            assert cache.get_or_load("k", lambda: "child") == "child"
            code = 2
            assert cache.get_or_load("other", lambda: "child-other") == "child-other"
            code = 3
            assert cache.get("k") == "child"  # stored: the store works in the child
            assert cache.stats().backend_errors == 0
            code = 0
        finally:
            os._exit(code)
    assert wait_child(pid, 20, "the child hung on its parent's in-flight load") == 0
    assert cache.get("k") == "child"  # the child's value; the parent still loads
    gate.open()
    join_all([leader])
    assert out == ["parent"] and gate.calls == 1
    assert cache.get("k") == "parent" and cache.get("other") == "child-other"
    assert cache.stats().backend_errors == 0


@pytest.mark.timeout(60)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("kind", ["disk", "redis"])
def test_an_async_child_forked_during_a_flight_loads_at_once(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The same with AsyncCoalescingCache: the parent's event loop (on a thread)
    leads "k" when the process forks; in the child, a new loop's get_or_load of
    "k" and of another key load at once."""
    from stampede import AsyncCoalescingCache

    if kind == "redis":
        url = request.getfixturevalue("redis_url")  # a client per event loop
    else:
        url = f"disk://{tmp_path / 'c'}"
    cache: AsyncCoalescingCache[str] = AsyncCoalescingCache(url, ttl=60)
    entered, opened = threading.Event(), threading.Event()

    async def load() -> str:
        entered.set()
        await asyncio.to_thread(opened.wait, 30)
        return "parent"

    leader, out = in_thread(lambda: asyncio.run(cache.get_or_load("k", load)))
    assert entered.wait(10)  # the parent's loop leads "k", its loader blocked
    pid = fork()  # with threads running
    if pid == 0:  # the child: neither the parent's loop nor its thread exists here

        async def child() -> int:
            if await cache.get_or_load("k", lambda: "child") != "child":
                return 2
            if await cache.get_or_load("other", lambda: "child-other") != "child-other":
                return 3
            if await cache.get("k") != "child" or cache.stats().backend_errors:
                return 4
            return 0

        code = 1
        try:
            code = asyncio.run(asyncio.wait_for(child(), 15))
        finally:
            os._exit(code)
    assert wait_child(pid, 20, "the child hung on its parent's in-flight load") == 0
    opened.set()
    join_all([leader])
    assert out == ["parent"]

    async def after() -> None:
        assert await cache.get("k") == "parent"
        assert await cache.get("other") == "child-other"

    asyncio.run(after())


def test_fanout_cache_works_but_not_for_leases(tmp_path: Path) -> None:
    folder = tmp_path / "fan"
    fan = diskcache.FanoutCache(str(folder), shards=4)
    os.chmod(folder, 0o700)
    cache: CoalescingCache[int] = CoalescingCache(fan, ttl=60, namespace="n")
    for i in range(20):
        assert cache.get_or_load(i, lambda i=i: i * i) == i * i
    assert all(cache.get(i) == i * i for i in range(20))
    cache.clear()
    assert all(cache.get(i) is None for i in range(20))
    with pytest.raises(ValueError, match="FanoutCache"):
        CoalescingCache(fan, distributed=True)
    fan.close()


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_blocking_pool_stays_blocking_without_its_retries(redis_url: str, flavour: str) -> None:
    """stampede's own pool, made without retries from a client's settings, is of the
    client's pool's kind: a ``BlockingConnectionPool`` keeps its size and its wait
    for a free connection (before, it became a plain pool that raises when full)."""
    from redis.backoff import ExponentialBackoff

    from stampede.backends import AsyncRedisBackend

    module: Any = redis.asyncio if flavour == "async" else redis
    retry = module.retry.Retry(ExponentialBackoff(), 5)
    pool = module.BlockingConnectionPool.from_url(
        redis_url, max_connections=3, timeout=2.5, retry=retry
    )
    client = module.Redis(connection_pool=pool)
    assert client.get_retry().get_retries() == 5
    store = AsyncRedisBackend(client) if flavour == "async" else RedisBackend(client)
    own = store.client.connection_pool
    assert own is not pool and type(own) is type(pool)
    assert (own.max_connections, own.timeout) == (3, 2.5)
    assert store.client.get_retry().get_retries() == 0


def test_a_client_made_as_the_docs_show_is_bounded_when_redis_pauses(
    fresh_redis_server: RedisServer,
) -> None:
    """redis-py retries a failed command by default (10 times with backoff in 8.x);
    stampede's own commands do not, so a paused Redis costs a call a few socket
    timeouts, not the retries' ~28 s, and the owner's client keeps its retries.

    Regression test for the audit's fault 3 (issue 11): the first get_or_load on a
    paused server blocked 28 s, and only then did the breaker open.
    """
    client = redis.Redis(
        host=fresh_redis_server.host, port=fresh_redis_server.port, db=2, socket_timeout=0.3
    )
    assert client.get_retry().get_retries() > 0  # the default, as users build it
    cache: CoalescingCache[int] = CoalescingCache(client, ttl=60)
    assert cache.get_or_load("warm", lambda: 1) == 1
    assert client.exists(str(cache._key("warm")))  # the client's settings kept (db 2)
    with fresh_redis_server.paused():
        started = time.monotonic()
        assert cache.get_or_load("k", lambda: 2) == 2  # failed open
        took = time.monotonic() - started
    assert took < 3.0, f"a call took {took:.1f} s with Redis paused"
    assert cache.stats().backend_errors >= 1
    assert client.get_retry().get_retries() > 0  # the owner's client is as it was
    client.close()


def test_an_async_client_made_as_the_docs_show_is_bounded_when_redis_pauses(
    fresh_redis_server: RedisServer,
) -> None:
    """The same for redis.asyncio (regression test for the audit's fault 3)."""
    import asyncio

    from stampede import AsyncCoalescingCache

    async def main() -> float:
        client = redis.asyncio.Redis(
            host=fresh_redis_server.host, port=fresh_redis_server.port, socket_timeout=0.3
        )
        assert client.get_retry().get_retries() > 0
        cache: AsyncCoalescingCache[int] = AsyncCoalescingCache(client, ttl=60)
        assert await cache.get_or_load("warm", lambda: 1) == 1
        with fresh_redis_server.paused():
            started = time.monotonic()
            assert await cache.get_or_load("k", lambda: 2) == 2
            took = time.monotonic() - started
        await client.aclose()
        await cache.backend.client.aclose()  # type: ignore[union-attr]
        return took

    took = asyncio.run(main())
    assert took < 3.0, f"a call took {took:.1f} s with Redis paused"


def test_an_async_cache_made_from_a_url_works_under_any_loop(redis_url: str) -> None:
    """A cache on a ``redis://`` URL, declared before any loop runs, works under
    ``asyncio.run()`` twice in a row and under two loops at once (a client per loop).

    Regression test for the audit's fault 5 (issue 11): the second asyncio.run()
    raised "RuntimeError: Event loop is closed", unwrapped and uncounted.
    """
    calls: list[int] = []

    @cached(cache=redis_url, ttl=60)
    async def double(x: int) -> int:
        calls.append(x)
        return x * 2

    async def main() -> tuple[int, int]:
        return await double(1), await double(2)

    assert asyncio.run(main()) == (2, 4)
    assert asyncio.run(main()) == (2, 4)  # a new loop
    results: list[tuple[int, int]] = []
    threads = [threading.Thread(target=lambda: results.append(asyncio.run(main()))) for _ in "ab"]
    for t in threads:
        t.start()
    join_all(threads)
    assert results == [(2, 4), (2, 4)]  # two loops at once
    assert calls == [1, 2]  # loaded once each: every later read was a hit in Redis
    assert double.cache.stats().backend_errors == 0


def test_a_given_async_client_used_from_another_loop_fails_open_counted(redis_url: str) -> None:
    """A redis.asyncio client given by its owner belongs to one loop; used from
    another, its error is a store failure: counted, and the call fails open.

    Regression test for the audit's fault 5 (issue 11): the RuntimeError reached
    the caller.
    """
    from stampede import AsyncCoalescingCache

    client = redis.asyncio.Redis.from_url(redis_url, retry=None)
    cache: AsyncCoalescingCache[int] = AsyncCoalescingCache(client, ttl=60)

    async def main(value: int) -> int:
        return await cache.get_or_load("k", lambda: value)

    assert asyncio.run(main(1)) == 1
    # Its connection belongs to the first loop: the first command from the new
    # one fails (counted); redis-py then reconnects from here, and the call ends
    # with the stored value or its own load, never the RuntimeError.
    assert asyncio.run(main(2)) in (1, 2)
    assert cache.stats().backend_errors >= 1


def test_a_distributed_wait_is_bounded_while_redis_is_paused(
    fresh_redis_server: RedisServer,
) -> None:
    """A process waiting for another's lease, on a client built as the docs show
    (redis-py's default retries), ends its wait within ``wait_timeout`` when Redis
    stops answering: it fails open, or times out, but is not held by retries.

    Coverage the audit found missing (issue 11, with fault 3): such waiters stayed
    blocked more than 8 s with wait_timeout=2.
    """

    from stampede import LoadTimeout

    def make() -> CoalescingCache[str]:
        client = redis.Redis(
            host=fresh_redis_server.host, port=fresh_redis_server.port, socket_timeout=0.3
        )
        return CoalescingCache(client, distributed=True, wait_timeout=2, ttl=60, lease_ttl=30)

    leader, waiter = make(), make()  # two processes, as far as leases go
    gate = Gate("leader's")
    lead = threading.Thread(target=leader.get_or_load, args=("k", gate), daemon=True)
    lead.start()
    assert gate.entered.wait(10)  # the leader holds the fleet's lease
    got: list[object] = []

    def wait() -> None:
        try:
            got.append(waiter.get_or_load("k", lambda: "waiter's"))
        except Exception as exc:  # LoadTimeout is a bound too
            got.append(exc)

    waiting = threading.Thread(target=wait, daemon=True)
    waiting.start()
    wait_until(lambda: waiter.stats().lease_waits == 1, what="the waiter waits for the lease")
    with fresh_redis_server.paused():
        started = time.monotonic()
        waiting.join(10)
        took = time.monotonic() - started
    gate.open()
    lead.join(10)
    assert not waiting.is_alive() and took < 2 + 1.5, f"the waiter took {took:.1f} s"
    assert got and (got[0] == "waiter's" or isinstance(got[0], LoadTimeout))
