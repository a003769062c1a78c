"""Per-function policy on a shared cache, ``cache_if=`` and a ``ttl=`` of the value
(DESIGN.md items 39 and 40).

Real stores throughout: in-process mappings, a private Redis, a diskcache folder.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
import redis

import stampede
from stampede import AsyncCoalescingCache, CoalescingCache, LoadTimeout, cached
from stampede.testing import FakeClock, Gate, wait_until
from tests.helpers import disk_store, join_all, run_threads

# -- per-function policy on one shared cache ------------------------------------------


def test_two_functions_on_one_shared_cache_keep_their_own_ttl() -> None:
    clock = FakeClock()
    shared: CoalescingCache[Any] = CoalescingCache(ttl=60, beta=0, clock=clock)
    calls = {"quote": 0, "profile": 0}

    @cached(cache=shared, ttl=5)
    def quote(symbol: str) -> str:
        calls["quote"] += 1
        return symbol

    @cached(cache=shared)  # the shared cache's own policy
    def profile(user: str) -> str:
        calls["profile"] += 1
        return user

    quote("A"), profile("u")
    clock.advance(6)
    quote("A"), profile("u")
    assert calls == {"quote": 2, "profile": 1}
    assert (quote.cache.ttl, profile.cache.ttl, shared.ttl) == (5, 60, 60)
    # One store, one set of counters: the view shares them.
    assert quote.cache.backend is shared.backend
    assert quote.cache.stats() == shared.stats()


def test_a_per_function_ttl_is_what_the_shared_redis_store_keeps(
    redis_client: redis.Redis, redis_url: str
) -> None:
    shared: CoalescingCache[Any] = CoalescingCache(redis_client, ttl=600, namespace="pf")

    @cached(cache=shared, ttl=5)
    def short(x: int) -> int:
        return x

    @cached(cache=shared)
    def long(x: int) -> int:
        return x

    short(1), long(1)
    lifetimes = {
        key.decode(): redis_client.pttl(key) for key in redis_client.scan_iter("stampede:*")
    }
    assert len(lifetimes) == 2
    short_ms = [ms for key, ms in lifetimes.items() if "short" in key]
    long_ms = [ms for key, ms in lifetimes.items() if "long" in key]
    assert 0 < short_ms[0] <= 5_000 < 590_000 < long_ms[0]


def test_per_function_cache_errors_and_error_ttl() -> None:
    clock = FakeClock()
    shared: CoalescingCache[Any] = CoalescingCache(ttl=60, clock=clock)
    calls = {"f": 0, "g": 0}

    @cached(cache=shared, cache_errors=(LookupError,), error_ttl=10)
    def f(x: int) -> int:
        calls["f"] += 1
        raise KeyError(x)

    @cached(cache=shared)
    def g(x: int) -> int:
        calls["g"] += 1
        raise KeyError(x)

    for _ in range(3):
        with pytest.raises(KeyError):
            f(1)
        with pytest.raises(KeyError):
            g(1)
    assert calls == {"f": 1, "g": 3}  # only f's error is negative-cached
    clock.advance(11)
    with pytest.raises(KeyError):
        f(1)
    assert calls["f"] == 2  # its error_ttl, not the shared cache's (5)


def test_per_function_wait_timeout_bounds_that_functions_waiters_only() -> None:
    shared: CoalescingCache[Any] = CoalescingCache(ttl=60)
    gate: Gate[int] = Gate(1)

    @cached(cache=shared, wait_timeout=0.05)
    def f(x: int) -> int:
        return gate()

    leader_out: list[Any] = []
    leader = threading.Thread(target=lambda: leader_out.append(f(1)), daemon=True)
    leader.start()
    assert gate.entered.wait(5)
    with pytest.raises(LoadTimeout):
        f(1)  # waits for the leader at most 0.05 s
    gate.open()
    leader.join(5)
    assert leader_out == [1]


def test_options_that_define_the_store_are_refused_with_what_to_do() -> None:
    shared: CoalescingCache[Any] = CoalescingCache()
    for option, value in [
        ("serializer", object()),
        ("namespace", "x"),
        ("distributed", True),
        ("lease_ttl", 3),
        ("near_maxsize", 10),
        ("maxsize", 10),
        ("on_backend_error", "raise"),
    ]:
        with pytest.raises(TypeError, match=rf"{option} defines the shared cache") as caught:
            cached(cache=shared, **{option: value})(lambda: 1)
        message = str(caught.value)
        assert "cache=<the client or URL>" in message and "ttl" in message
    with pytest.raises(TypeError, match="unexpected keyword"):
        cached(cache=shared, nope=1)(lambda: 1)  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="ttl"):
        cached(cache=shared, ttl=-1)(lambda: 1)


def test_two_functions_of_one_name_are_still_refused_on_policy_views() -> None:
    shared: CoalescingCache[Any] = CoalescingCache()

    def make() -> Any:
        @cached(cache=shared, ttl=1)
        def same(x: int) -> int:
            return x

        return same

    kept = make()
    with pytest.raises(TypeError, match="already uses this shared cache"):
        make()
    assert kept(1) == 1


def test_per_function_policy_on_a_shared_async_redis_cache(redis_url: str) -> None:
    async def main() -> None:
        client = redis.asyncio.Redis.from_url(redis_url)
        shared: AsyncCoalescingCache[Any] = AsyncCoalescingCache(client, ttl=600)

        @cached(cache=shared, ttl=3, beta=0)
        async def f(x: int) -> int:
            return x

        assert await f(2) == 2 and await f(2) == 2
        assert (f.cache.ttl, f.cache.beta, shared.ttl, shared.beta) == (3, 0, 600, 1.0)
        keys = [key async for key in client.scan_iter("stampede:*")]
        assert len(keys) == 1 and 0 < await client.pttl(keys[0]) <= 3_000
        await client.aclose()

    asyncio.run(main())


# -- cache_if ------------------------------------------------------------------------------


def test_a_result_cache_if_refuses_reaches_every_waiter_and_is_not_stored() -> None:
    cache: CoalescingCache[Any] = CoalescingCache(ttl=60, cache_if=lambda v: v is not None)
    gate: Gate[None] = Gate(None)
    got: list[Any] = []

    def call() -> None:
        got.append(cache.get_or_load("k", gate))

    threads = run_threads(8, call)
    wait_until(lambda: cache.stats().coalesced == 7, what="seven waiters")
    gate.open()
    join_all(threads)
    assert got == [None] * 8 and gate.calls == 1  # one load for all, its None to all
    assert cache.get("k", "absent") == "absent"  # not stored
    assert cache.get_or_load("k", lambda: 5) == 5  # the next call loads again
    assert cache.get("k") == 5
    assert cache.stats().not_stored == 1


def test_cache_if_per_call_and_per_function() -> None:
    cache: CoalescingCache[Any] = CoalescingCache(ttl=60)
    assert cache.get_or_load("a", lambda: [], cache_if=bool) == []
    assert cache.get("a", "absent") == "absent"
    assert cache.get_or_load("b", lambda: [1], cache_if=bool) == [1]
    assert cache.get("b") == [1]
    calls = 0

    @cached(cache=cache, cache_if=lambda v: v >= 0)
    def f(x: int) -> int:
        nonlocal calls
        calls += 1
        return x

    f(-1), f(-1), f(2), f(2)
    assert calls == 3


def test_a_refused_refresh_drops_the_value_it_would_have_replaced() -> None:
    clock = FakeClock()
    answers = iter(["old", None, "new"])
    cache: CoalescingCache[Any] = CoalescingCache(
        ttl=10, beta=0, stale_ttl=100, clock=clock, cache_if=lambda v: v is not None
    )

    def load() -> Any:
        return next(answers)

    assert cache.get_or_load("k", load) == "old"
    assert cache.refresh("k", load) is None  # the origin says: nothing (not cached)
    # The old value is not served as if it were current.
    assert cache.get("k", "absent") == "absent"
    assert cache.get_or_load("k", load) == "new"


def test_cache_if_on_a_distributed_cache_frees_the_lease_and_writes_nothing(
    redis_client: redis.Redis,
) -> None:
    cache: CoalescingCache[Any] = CoalescingCache(
        redis_client, ttl=60, distributed=True, namespace="ci", cache_if=lambda v: v != "skip"
    )
    assert cache.get_or_load("k", lambda: "skip") == "skip"
    assert list(redis_client.scan_iter("*")) == []  # no value, no lease left behind
    assert cache.get_or_load("k", lambda: "keep") == "keep"
    assert len(list(redis_client.scan_iter("stampede:*"))) == 1


def test_cache_if_async_and_on_disk(tmp_path: Path) -> None:
    async def main() -> None:
        cache: AsyncCoalescingCache[Any] = AsyncCoalescingCache(
            disk_store(tmp_path), ttl=60, cache_if=lambda v: v is not None
        )
        calls = 0

        async def load() -> None:
            nonlocal calls
            calls += 1

        results = await asyncio.gather(*(cache.get_or_load("k", load) for _ in range(50)))
        assert results == [None] * 50 and calls == 1
        assert await cache.get("k", "absent") == "absent"
        assert await cache.get_or_load("k", load) is None and calls == 2

    asyncio.run(main())


# -- ttl as a function of the value -----------------------------------------------------------


def test_a_ttl_function_sets_each_values_freshness() -> None:
    clock = FakeClock()
    cache: CoalescingCache[Any] = CoalescingCache(
        ttl=lambda v: 1 if v == "short" else 100, beta=0, clock=clock
    )
    cache.get_or_load("s", lambda: "short")
    cache.get_or_load("l", lambda: "long")
    clock.advance(2)
    assert cache.get("s", "expired") == "expired"
    assert cache.get("l") == "long"
    cache.set("s2", "short")  # set() asks the function too
    clock.advance(2)
    assert cache.get("s2", "expired") == "expired"


def test_a_ttl_function_answering_zero_or_none_keeps_the_value_out() -> None:
    cache: CoalescingCache[Any] = CoalescingCache(ttl=lambda v: v)
    assert cache.get_or_load("zero", lambda: 0) == 0
    assert cache.get_or_load("none", lambda: None) is None
    assert cache.get("zero", "absent") == cache.get("none", "absent") == "absent"
    cache.set("k", 30)
    assert cache.get("k") == 30
    cache.set("k", 0)  # a set the function refuses drops what was there
    assert cache.get("k", "absent") == "absent"
    assert cache.stats().not_stored == 3


def test_a_failing_ttl_or_cache_if_function_loses_no_value(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def bad(value: Any) -> float:
        raise ValueError("oops")

    cache: CoalescingCache[Any] = CoalescingCache(ttl=bad)
    with caplog.at_level(logging.WARNING, logger="stampede"):
        assert cache.get_or_load("k", lambda: "v") == "v"
    assert cache.get("k", "absent") == "absent"
    assert "not stored" in caplog.text
    nonsense: CoalescingCache[Any] = CoalescingCache(ttl=lambda v: -5)
    assert nonsense.get_or_load("k", lambda: "v") == "v"
    assert nonsense.get("k", "absent") == "absent"
    refusing: CoalescingCache[Any] = CoalescingCache(cache_if=lambda v: 1 / 0)
    assert refusing.get_or_load("k", lambda: "v") == "v"
    assert refusing.stats().not_stored == 1


def test_a_ttl_function_on_redis_sets_the_stores_lifetime(redis_client: redis.Redis) -> None:
    cache: CoalescingCache[Any] = CoalescingCache(
        redis_client, ttl=lambda v: 2 if v == "short" else 500, namespace="tf"
    )
    cache.get_or_load("a", lambda: "short")
    cache.get_or_load("b", lambda: "long")
    lifetimes = sorted(redis_client.pttl(k) for k in redis_client.scan_iter("stampede:*"))
    assert 0 < lifetimes[0] <= 2_000 and lifetimes[1] > 400_000


def test_cache_if_and_ttl_options_are_checked() -> None:
    with pytest.raises(TypeError, match="cache_if"):
        CoalescingCache(cache_if=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ttl"):
        CoalescingCache(ttl=0)
    assert stampede.CoalescingCache(ttl=lambda v: 1).ttl == 60  # the fixed default stays
