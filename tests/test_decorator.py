"""@cached on every kind of callable, its helpers, and its keys."""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

import stampede
from stampede import AsyncCoalescingCache, CoalescingCache, cached
from stampede.testing import AsyncGate, FakeClock, Gate, async_wait_until, wait_until

from .helpers import disk_store, join_all, run_threads


def test_plain_function_keeps_identity_and_caches() -> None:
    calls: list[int] = []

    @cached(ttl=60)
    def double(x: int) -> int:
        """Double it."""
        calls.append(x)
        return 2 * x

    assert double(2) == 4 and double(2) == 4 and calls == [2]
    assert double.__name__ == "double" and double.__doc__ == "Double it."
    assert double.__wrapped__(5) == 10
    assert inspect.signature(double) == inspect.signature(double.__wrapped__)
    assert isinstance(double.cache, CoalescingCache)


def test_bare_decorator_form() -> None:
    @cached
    def one() -> int:
        return 1

    assert one() == 1 and one.cache_info().hits == 0 and one() == 1
    assert one.cache_info().hits == 1


def test_positional_keyword_and_default_calls_share_a_key() -> None:
    calls = 0

    @cached(ttl=60)
    def f(x: int, y: int = 10) -> int:
        nonlocal calls
        calls += 1
        return x + y

    assert f(1) == f(x=1) == f(1, 10) == f(1, y=10) == f(y=10, x=1) == 11
    assert calls == 1
    assert f.cache_key(1) == f.cache_key(x=1, y=10)


def test_bad_calls_raise_the_functions_own_type_error() -> None:
    @cached
    def f(x: int) -> int:
        return x

    with pytest.raises(TypeError):
        f()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        f(1, 2)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        f(z=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        f(1, x=1)  # type: ignore[misc]


def test_var_args_and_keyword_only() -> None:
    calls = 0

    @cached
    def f(a: int, *rest: int, scale: int = 1, **extra: int) -> int:
        nonlocal calls
        calls += 1
        return (a + sum(rest) + sum(extra.values())) * scale

    assert f(1, 2, 3) == 6 and f(1, 2, 3) == 6 and calls == 1
    assert f(1, 2, 3, scale=1) == 6 and calls == 1  # the default filled in
    assert f(1, b=1, c=2) == f(1, c=2, b=1) == 4 and calls == 2  # kwargs order is irrelevant
    # *rest (2,) and a keyword b=2 are different calls
    assert f(1, 2) == 3 and f(1, b=2) == 3 and calls == 4


def test_unhashable_argument_names_the_parameter() -> None:
    @cached
    def f(x: int, items: list[int]) -> int:
        return x + len(items)

    with pytest.raises(TypeError, match=r"'items'.*key="):
        f(1, [1, 2])


def test_key_function_handles_unhashable_arguments() -> None:
    calls = 0

    @cached(key=lambda x, items: (x, tuple(items)))
    def f(x: int, items: list[int]) -> int:
        nonlocal calls
        calls += 1
        return x + len(items)

    assert f(1, [1, 2]) == f(1, [1, 2]) == 3 and calls == 1
    assert f.cache_key(1, [1, 2]) == (1, (1, 2))


def test_typed_keys() -> None:
    seen: list[Any] = []

    @cached(typed=True)
    def t(x: Any) -> str:
        seen.append(x)
        return repr(x)

    @cached
    def u(x: Any) -> str:
        return repr(x)

    assert [t(1), t(1.0), t(True), t("1")] == ["1", "1.0", "True", "'1'"]
    assert len(seen) == 4
    assert [u(1), u(1.0), u(True)] == ["1", "1", "1"]  # untyped: equal values share a key


def test_separator_lookalikes_never_collide() -> None:
    @cached
    def join(a: str, b: str) -> str:
        return f"{a}|{b}"

    assert join("a:b", "c") == "a:b|c"
    assert join("a", "b:c") == "a|b:c"


def test_methods_static_and_class_methods() -> None:
    class Repo:
        loads = 0

        def __init__(self, base: int) -> None:
            self.base = base

        @cached
        def get(self, x: int) -> int:
            Repo.loads += 1
            return self.base + x

        @staticmethod
        @cached
        def static(x: int) -> int:
            return x * 3

        @cached  # type: ignore[misc]
        @staticmethod
        def static_outer(x: int) -> int:
            return x * 4

        @classmethod
        @cached
        def klass(cls, x: int) -> str:
            return f"{cls.__name__}{x}"

    a, b = Repo(100), Repo(200)
    assert (a.get(1), a.get(1), b.get(1)) == (101, 101, 201)
    assert Repo.loads == 2  # self is part of the key
    assert Repo.static(2) == 6 and a.static(2) == 6
    assert Repo.static_outer(2) == 8 and a.static_outer(2) == 8
    assert Repo.klass(1) == "Repo1"
    Repo.get.invalidate(a, 1)  # documented: helpers take self explicitly
    assert a.get(1) == 101 and Repo.loads == 3


def test_helpers_invalidate_refresh_clear_info() -> None:
    counter = iter(range(100))

    @cached(ttl=60, maxsize=10)
    def f(x: int) -> tuple[int, int]:
        return (x, next(counter))

    assert f(1) == (1, 0)
    assert f(1) == (1, 0)
    f.invalidate(1)
    assert f(1) == (1, 1)
    assert f.refresh(x=1) == (1, 2)
    assert f(1) == (1, 2)
    f(2)
    info = f.cache_info()
    assert (info.maxsize, info.currsize) == (10, 2)
    assert info.hits == info.stats.hits and info.misses == info.stats.misses
    f.cache_clear()
    assert f.cache_info().currsize == 0
    assert f(1) == (1, 4)


def test_shared_cache_keeps_functions_apart() -> None:
    shared: CoalescingCache[Any] = CoalescingCache(ttl=60)

    @cached(cache=shared)
    def a(x: int) -> str:
        return f"a{x}"

    @cached(cache=shared)
    def b(x: int) -> str:
        return f"b{x}"

    assert (a(1), b(1), a(2)) == ("a1", "b1", "a2")
    assert a.cache_info().currsize == 2 and b.cache_info().currsize == 1
    a.cache_clear()
    assert a.cache_info().currsize == 0 and b.cache_info().currsize == 1
    shared.set("plain", 1)
    assert shared.get("plain") == 1


def test_same_named_functions_cannot_share_a_cache() -> None:
    """Two live functions of one name are refused on one shared cache (keys would mix).

    Regression test for 3a21f4a (Review fixes: same-named functions refused on a
    shared cache).
    """
    shared: CoalescingCache[Any] = CoalescingCache()
    inc = cached(cache=shared)(lambda x: x + 1)
    with pytest.raises(TypeError, match="already uses this shared cache"):
        cached(cache=shared)(lambda x: x - 1)
    assert inc(1) == 2
    assert cached(cache=shared, key=lambda x: ("dec", x))(lambda x: x - 1)(1) == 0


def test_callables_without_a_qualname() -> None:
    """A callable with no ``__qualname__`` (a ``functools.partial``) can be decorated.

    Regression test for 3a21f4a (Review fixes: same-named functions refused on a
    shared cache).
    """

    def add(a: int, b: int) -> int:
        return a + b

    inc = cached(functools.partial(add, 1))
    assert inc(2) == 3 and inc(2) == 3


def test_shared_cache_clear_fences_a_load_in_flight() -> None:
    """cache_clear() on a shared cache fences the function's load in flight: it stores nothing.

    Regression test for 3a21f4a (Review fixes: cache_clear and async clear fence
    in-flight loads).
    """
    shared: CoalescingCache[Any] = CoalescingCache()
    gate = Gate("before-clear")

    @cached(cache=shared)
    def slow(x: int) -> str:
        return gate()

    t = threading.Thread(target=slow, args=(1,))
    t.start()
    assert gate.entered.wait(5)
    slow.cache_clear()
    gate.open()
    join_all([t])
    assert slow.cache_info().currsize == 0  # the load did not store after the clear


def _store_keys(store: Any) -> list[str]:
    """Every key in a diskcache store or on a Redis server, as text."""
    if isinstance(store, redis.Redis):
        return [k.decode() for k in store.scan_iter("*")]
    return [k for k in store.iterkeys() if isinstance(k, str)]


@pytest.mark.parametrize("length", [50, 150, 300])
@pytest.mark.parametrize("kind", ["disk", "redis"])
def test_cache_clear_on_a_shared_store_whatever_the_name_length(
    kind: str, length: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """cache_clear() drops every entry of a function on a shared store, hashed keys
    included, and fences its loads in flight, however long ``module.qualname`` is.

    Before the fix the function's key prefix held its whole name: past ~114
    characters, entries with long (hashed) arguments survived the clear and
    their loads in flight stored; past ~190, cache_clear() raised AssertionError.
    """
    if kind == "redis":
        store: Any = redis.Redis.from_url(request.getfixturevalue("redis_url"))
    else:
        store = disk_store(tmp_path)
    shared: CoalescingCache[Any] = CoalescingCache(store, ttl=60)
    calls: list[str] = []
    gates = {"short": Gate("stale"), "x" * 500: Gate("stale")}

    def f(x: str) -> str:
        calls.append(x)
        gate = gates.get(x)
        return gate() if gate is not None else f"f{len(x)}"

    f.__qualname__ = "N" * (length - len(f"{__name__}."))  # module.qualname: `length` chars
    fn = cached(cache=shared)(f)

    @cached(cache=shared)
    def other(x: str) -> str:
        return f"g{len(x)}"

    assert len(f"{fn.__module__}.{fn.__qualname__}") == length
    args = ["a", "y" * 500]  # a short key, and a long one (hashed)
    for a in args:
        assert (fn(a), other(a)) == (f"f{len(a)}", f"g{len(a)}")
    assert len(_store_keys(store)) == 4
    # One load in flight per kind of key, each gated until after the clear.
    threads = [threading.Thread(target=fn, args=(x,), daemon=True) for x in gates]
    for t in threads:
        t.start()
    for gate in gates.values():
        assert gate.entered.wait(10)

    fn.cache_clear()
    for gate in gates.values():
        gate.open()
    join_all(threads)

    assert len(_store_keys(store)) == 2  # only other()'s entries are left
    calls.clear()
    for a in [*args, *gates]:
        gates.pop(a, None)  # loaded again now: no gate
        fn(a)
        assert other(a) == f"g{len(a)}"
    assert calls == [*args, "short", "x" * 500]  # every call of fn() was a miss
    assert len(_store_keys(store)) == 8
    store.close()


def test_cache_argument_forms() -> None:
    store: dict[Any, Any] = {}

    @cached(cache=store, ttl=5)
    def from_mapping(x: int) -> int:
        return x

    @cached(cache="memory://?maxsize=3")
    def from_url(x: int) -> int:
        return x

    from_mapping(1)
    assert len(store) == 1
    for i in range(5):
        from_url(i)
    assert len(from_url.cache.backend) == 3  # the URL's maxsize bounds the store


def test_misuse_is_a_clear_type_error() -> None:
    with pytest.raises(TypeError, match="AsyncCoalescingCache"):

        @cached(cache=CoalescingCache())
        async def f() -> int:
            return 1

    with pytest.raises(TypeError, match="CoalescingCache"):

        @cached(cache=AsyncCoalescingCache())
        def g() -> int:
            return 1

    # Options that define the store are refused next to a ready cache, saying what to do.
    with pytest.raises(TypeError, match=r"serializer defines the shared cache.*cache=<the client"):

        @cached(cache=CoalescingCache(), serializer=object())
        def h() -> int:
            return 1


def test_decorator_options_reach_the_cache() -> None:
    clock = FakeClock()
    calls = 0

    @cached(ttl=10, beta=0, stale_ttl=5, cache_errors=(KeyError,), error_ttl=2, clock=clock)
    def f(x: int) -> int:
        nonlocal calls
        calls += 1
        if x < 0:
            raise KeyError(x)
        return x

    assert f.cache.ttl == 10 and f.cache.stale_ttl == 5 and f.cache.error_ttl == 2
    with pytest.raises(KeyError):
        f(-1)
    with pytest.raises(KeyError):
        f(-1)
    assert calls == 1
    assert f.cache.name.endswith("test_decorator_options_reach_the_cache.<locals>.f")


def test_sync_cold_key_many_threads_one_call() -> None:
    gate = Gate("v")

    @cached(ttl=60)
    def slow(x: int) -> str:
        return gate()

    barrier = threading.Barrier(200)
    got: list[str] = []
    lock = threading.Lock()

    def caller() -> None:
        barrier.wait()
        v = slow(1)
        with lock:
            got.append(v)

    threads = run_threads(200, caller)
    wait_until(lambda: slow.cache_info().stats.coalesced == 199)
    gate.open()
    join_all(threads)
    assert gate.calls == 1 and got == ["v"] * 200


# -- async -----------------------------------------------------------------------------


def test_async_function() -> None:
    calls = 0

    @cached(ttl=60)
    async def fetch(x: int, y: int = 1) -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        return x * y

    assert inspect.iscoroutinefunction(fetch)
    assert isinstance(fetch.cache, AsyncCoalescingCache)

    async def main() -> None:
        assert await fetch(3) == 3
        assert await fetch(x=3, y=1) == 3
        assert calls == 1
        await fetch.invalidate(3)
        assert await fetch(3) == 3 and calls == 2
        assert await fetch.refresh(3) == 3 and calls == 3
        await fetch.cache_clear()
        assert fetch.cache_info().currsize == 0

    asyncio.run(main())


def test_async_decorated_at_import_time_works_in_several_loops() -> None:
    @cached
    async def f(x: int) -> int:
        return x

    assert asyncio.run(f(1)) == 1
    assert asyncio.run(f(1)) == 1
    assert f.cache_info().hits == 1


def test_async_cold_key_many_tasks_one_call() -> None:
    async def main() -> None:
        gate = AsyncGate("v")

        @cached
        async def slow(x: int) -> str:
            return await gate()

        tasks = [asyncio.ensure_future(slow(1)) for _ in range(2000)]
        await async_wait_until(lambda: slow.cache_info().stats.coalesced == 1999)
        gate.open()
        assert await asyncio.gather(*tasks) == ["v"] * 2000
        assert gate.calls == 1

    asyncio.run(asyncio.wait_for(main(), 20))


def test_async_method_and_unhashable() -> None:
    class Svc:
        @cached
        async def get(self, x: int) -> int:
            return x + 1

        @cached
        async def bad(self, items: list[int]) -> int:
            return len(items)

    async def main() -> None:
        s = Svc()
        assert await s.get(1) == 2
        with pytest.raises(TypeError, match="'items'"):
            await s.bad([1])

    asyncio.run(main())


# -- on shared stores (Redis, diskcache) -------------------------------------------------


def test_async_cached_on_an_asyncio_redis_client(redis_url: str) -> None:
    """An async function decorated on a redis.asyncio client loads once, then hits.

    Regression test for 3a21f4a (Review fixes: @cached on shared stores goes through
    get_or_load (async Redis hit path, store failures)).
    """

    async def main() -> None:
        client = redis.asyncio.Redis.from_url(redis_url)
        calls = 0

        @cached(cache=client, ttl=60)
        async def double(x: int) -> int:
            nonlocal calls
            calls += 1
            return 2 * x

        assert await double(1) == 2 and await double(1) == 2 and calls == 1
        await client.aclose()

    asyncio.run(main())


def test_cached_on_disk_survives_a_corrupt_entry(tmp_path: Path) -> None:
    """A decorated function on diskcache reads a corrupt entry as a counted miss, not an error.

    Regression test for 3a21f4a (Review fixes: @cached on shared stores goes through
    get_or_load (async Redis hit path, store failures)).
    """
    store = disk_store(tmp_path)

    @cached(cache=store, ttl=60)
    def double(x: int) -> int:
        return 2 * x

    assert double(1) == 2
    (key,) = [k for k in store.iterkeys() if isinstance(k, str)]
    store.set(key, b"garbage", expire=60)
    assert double(1) == 2
    assert double.cache_info().stats.serialization_errors == 1


def test_async_cache_clear_of_a_function_on_a_shared_redis_cache(redis_url: str) -> None:
    """An async function's cache_clear() on a shared redis.asyncio cache drops its keys only.

    Regression test for 534c4d9 (@cached cache_clear on a shared async store awaits
    the store's clear).
    """

    async def main() -> None:
        client = redis.asyncio.Redis.from_url(redis_url)
        shared: AsyncCoalescingCache[Any] = AsyncCoalescingCache(client, ttl=60)

        @cached(cache=shared)
        async def f(x: int) -> int:
            return x

        @cached(cache=shared)
        async def g(x: int) -> int:
            return -x

        assert (await f(1), await g(1)) == (1, -1)
        await f.cache_clear()  # was a sync clear on an asyncio client: TypeError
        assert len([k async for k in client.scan_iter("stampede:*")]) == 1  # g's stays
        await client.aclose()

    asyncio.run(main())


def test_public_api_is_pinned() -> None:
    assert sorted(stampede.__all__) == sorted(
        [
            "MISSING",
            "AsyncCachedFunction",
            "AsyncCachedManyFunction",
            "AsyncCoalescingCache",
            "AsyncIdempotency",
            "AsyncSingleFlight",
            "BackendUnavailable",
            "BlockingWaitInLoop",
            "CacheInfo",
            "CachedFunction",
            "CachedManyFunction",
            "CoalescingCache",
            "Idempotency",
            "IdempotencyError",
            "InFlight",
            "KeyReused",
            "LoadAbandoned",
            "LoadTimeout",
            "LoggingMetrics",
            "MetricsHook",
            "RecursiveLoad",
            "ReplayUnavailable",
            "SerializationError",
            "SingleFlight",
            "StampedeError",
            "Stats",
            "__version__",
            "bind",
            "cached",
            "cached_many",
            "deferred",
        ]
    )
    for name in stampede.__all__:
        assert hasattr(stampede, name)


def test_options_are_one_typed_list_readable_at_run_time() -> None:
    """The options' annotations resolve at run time (tools read them), and ``None``
    means an option's default, for the caches and for @cached alike."""
    import typing

    hints = typing.get_type_hints(stampede.CoalescingCache.__init__, include_extras=True)
    assert "options" in hints
    typing.get_type_hints(stampede.AsyncCoalescingCache.__init__)
    cache: stampede.CoalescingCache[int] = stampede.CoalescingCache(ttl=None, beta=None)
    assert (cache.ttl, cache.beta) == (60.0, 1.0)
    with pytest.raises(TypeError, match="tll"):
        stampede.CoalescingCache(tll=3)  # type: ignore[call-arg]

    @stampede.cached(ttl=None, maxsize=None)
    def f(x: int) -> int:
        return x

    assert f(1) == 1 and f.cache.ttl == 60.0
