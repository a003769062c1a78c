"""Caches declared at import time, bound at startup (DESIGN.md item 43).

``@cached(cache=stampede.deferred(name))`` before the store exists;
``stampede.bind(name, store)`` at startup. The FastAPI lifespan case runs for
real in tests/test_example_service.py (uvicorn workers binding on startup).
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import uuid
from typing import Any

import pytest
import redis

import stampede
from stampede import AsyncCoalescingCache, CoalescingCache, StampedeError, cached
from stampede.testing import Gate, wait_until
from tests.helpers import join_all, run_threads


def fresh_name() -> str:
    return f"store-{uuid.uuid4().hex[:8]}"


def test_a_call_before_binding_says_what_to_bind() -> None:
    name = fresh_name()

    @cached(cache=stampede.deferred(name), ttl=5)
    def price(symbol: str) -> float:
        return 1.0

    with pytest.raises(StampedeError, match=rf"stampede.bind\('{name}'"):
        price("A")
    for helper in (price.invalidate, price.refresh):
        with pytest.raises(StampedeError, match="not bound yet"):
            helper("A")
    with pytest.raises(StampedeError, match="not bound yet"):
        price.cache_info()
    with pytest.raises(StampedeError, match="not bound yet"):
        price.cache.get("A")
    # What the function is, it is already: name, signature, the function it wraps.
    assert price.__name__ == "price" and price.__wrapped__.__name__ == "price"
    assert list(inspect.signature(price).parameters) == ["symbol"]


def test_binding_builds_the_same_cached_function_as_passing_the_store() -> None:
    name = fresh_name()
    calls = 0

    @cached(cache=stampede.deferred(name), ttl=30)
    def price(symbol: str) -> str:
        nonlocal calls
        calls += 1
        return symbol * 2

    store: dict[Any, Any] = {}
    stampede.bind(name, store)
    assert price("ab") == price("ab") == "abab" and calls == 1
    assert price.cache.ttl == 30 and price.cache_info().hits == 1
    price.invalidate("ab")
    assert price("ab") == "abab" and calls == 2
    assert len(store) == 1  # in the mapping bound


def test_functions_declared_after_binding_are_built_at_once() -> None:
    name = fresh_name()
    shared: CoalescingCache[Any] = CoalescingCache(ttl=60)
    stampede.bind(name, shared)

    @cached(cache=stampede.deferred(name), ttl=3)  # a policy of its own on the shared cache
    def late(x: int) -> int:
        return x + 1

    assert late(1) == 2 and late.cache.ttl == 3 and late.cache.backend is shared.backend


def test_a_bound_function_runs_the_hit_path_and_coalesces_threads() -> None:
    name = fresh_name()
    gate: Gate[str] = Gate("v")

    @cached(cache=stampede.deferred(name))
    def slow(key: str) -> str:
        return gate()

    stampede.bind(name, CoalescingCache(ttl=60))
    got: list[str] = []
    threads = run_threads(20, lambda: got.append(slow("k")))
    wait_until(lambda: slow.cache.stats().coalesced == 19, what="19 waiters")
    gate.open()
    join_all(threads)
    assert got == ["v"] * 20 and gate.calls == 1
    hits = slow.cache.stats().hits
    assert slow("k") == "v" and slow.cache.stats().hits == hits + 1
    # Once bound the function's own code is the compiled hit path, nothing in between.
    assert "hit path" in slow.__code__.co_filename


def test_a_mismatched_store_fails_at_bind_and_leaves_nothing_half_bound() -> None:
    name = fresh_name()

    @cached(cache=stampede.deferred(name))
    def sync_fn(x: int) -> int:
        return x

    @cached(cache=stampede.deferred(name))
    async def async_fn(x: int) -> int:
        return x

    with pytest.raises(TypeError, match="AsyncCoalescingCache"):
        stampede.bind(name, CoalescingCache())
    with pytest.raises(StampedeError, match="not bound yet"):
        sync_fn(1)  # all or nothing: the sync one was not left bound
    assert not stampede.deferred(name).bound
    stampede.bind(name, {})  # a plain store: each function makes its own cache on it
    assert sync_fn(1) == 1
    assert asyncio.run(async_fn(2)) == 2
    assert inspect.iscoroutinefunction(async_fn)


def test_binding_again_rebuilds_on_the_new_store() -> None:
    name = fresh_name()

    @cached(cache=stampede.deferred(name))
    def f(x: int) -> int:
        return x

    first: dict[Any, Any] = {}
    second: dict[Any, Any] = {}
    stampede.bind(name, first)
    f(1)
    stampede.bind(name, second)  # a second application started in this process
    f(1), f(2)
    assert len(first) == 1 and len(second) == 2
    with pytest.raises(TypeError):
        stampede.bind(name, None)
    with pytest.raises(TypeError):
        stampede.deferred("")


def test_bind_at_startup_on_an_asyncio_redis_client(redis_url: str) -> None:
    name = fresh_name()
    calls = 0

    @cached(cache=stampede.deferred(name), ttl=60)
    async def profile(user: int) -> dict[str, int]:
        nonlocal calls
        calls += 1
        return {"id": user}

    async def lifespan() -> None:
        # What a FastAPI lifespan does: make the client on the running loop, bind.
        client = redis.asyncio.Redis.from_url(redis_url)
        stampede.bind(name, AsyncCoalescingCache(client, distributed=True, namespace=name))
        results = await asyncio.gather(*(profile(7) for _ in range(100)))
        assert results == [{"id": 7}] * 100 and calls == 1
        assert len([k async for k in client.scan_iter(f"*{name}*")]) == 1
        await client.aclose()

    asyncio.run(lifespan())


def test_concurrent_calls_while_binding_get_the_bound_cache_or_the_clear_error() -> None:
    name = fresh_name()

    @cached(cache=stampede.deferred(name))
    def f(x: int) -> int:
        return x

    outcomes: list[object] = []
    started = threading.Barrier(5)

    def call() -> None:
        started.wait(5)
        for _ in range(200):
            try:
                outcomes.append(f(1))
            except StampedeError:
                outcomes.append("unbound")

    threads = run_threads(4, call)
    started.wait(5)
    stampede.bind(name, {})
    join_all(threads)
    assert set(outcomes) <= {1, "unbound"} and f(1) == 1


def test_an_unbound_cache_is_an_attribute_error_for_getattr_and_hasattr() -> None:
    name = fresh_name()

    @cached(cache=stampede.deferred(name))
    def f(x: int) -> int:
        return x

    assert getattr(f.cache, "get", "absent") == "absent"  # a NotBound is an AttributeError
    assert not hasattr(f.cache, "stats")
    stampede.bind(name, {})
    assert f.cache.get(1) is None
