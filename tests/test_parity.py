"""One list of scenarios run through both CoalescingCache and AsyncCoalescingCache.

This is how the two shells are kept from drifting: every decision (hit,
XFetch, stale, negative, fencing, get/set/invalidate) must come out the same.
Time is a FakeClock; the random draw is scripted.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cachetools
import diskcache
import pytest
import redis
import redis.asyncio

from stampede import AsyncCoalescingCache, CoalescingCache
from stampede.testing import Draws, FakeClock, async_wait_until, wait_until


class SyncDriver:
    flavour = "sync"

    def __init__(self, **options: Any) -> None:
        self.cache: CoalescingCache[Any] = CoalescingCache(**options)

    def get_or_load(self, key: Any, loader: Callable[[], Any]) -> Any:
        return self.cache.get_or_load(key, loader)

    def get(self, key: Any, default: Any = None) -> Any:
        return self.cache.get(key, default)

    def set(self, key: Any, value: Any, ttl: float | None = None) -> None:
        self.cache.set(key, value, ttl)

    def invalidate(self, key: Any) -> None:
        self.cache.invalidate(key)

    def settle(self) -> None:
        """Wait until no load or background refresh is running."""
        wait_until(lambda: len(self.cache._flight) == 0, what="background refresh")

    def close(self) -> None:
        self.settle()


class AsyncDriver:
    flavour = "async"

    def __init__(self, **options: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.cache: AsyncCoalescingCache[Any] = AsyncCoalescingCache(**options)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 10))

    def get_or_load(self, key: Any, loader: Callable[[], Any]) -> Any:
        return self.run(self.cache.get_or_load(key, loader))

    def get(self, key: Any, default: Any = None) -> Any:
        return self.run(self.cache.get(key, default))

    def set(self, key: Any, value: Any, ttl: float | None = None) -> None:
        self.run(self.cache.set(key, value, ttl))

    def invalidate(self, key: Any) -> None:
        self.run(self.cache.invalidate(key))

    def settle(self) -> None:
        self.run(async_wait_until(lambda: len(self.cache._flight) == 0))

    def close(self) -> None:
        self.settle()
        self.loop.close()


Driver = SyncDriver | AsyncDriver


FLAVOURS = {"sync": SyncDriver, "async": AsyncDriver}
STORES = ["memory", "disk", "redis"]


@pytest.fixture(params=[(f, s) for s in STORES for f in FLAVOURS], ids=lambda p: f"{p[0]}-{p[1]}")
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Driver]]:
    """Drivers of one flavour on one kind of store; the scenarios run on every pair."""
    flavour, store = request.param
    made: list[Driver] = []
    closers: list[Callable[[Driver], None]] = []
    shared: dict[str, Any] = {}

    def backend() -> Any:
        if store == "disk":
            if "disk" not in shared:
                folder = tmp_path / "cache"
                shared["disk"] = diskcache.Cache(str(folder))
                os.chmod(folder, 0o700)
            return shared["disk"]
        url = request.getfixturevalue("redis_url")
        if flavour == "sync":
            client = redis.Redis.from_url(url)
            closers.append(lambda _d: client.close())
        else:
            client = redis.asyncio.Redis.from_url(url)
            closers.append(lambda d: d.run(client.aclose()))  # type: ignore[union-attr]
        return client

    def factory(**options: Any) -> Driver:
        if store != "memory":
            if "backend" in options:
                pytest.skip("a scenario about in-memory mappings")
            options["backend"] = backend()
        driver: Driver = FLAVOURS[flavour](**options)
        made.append(driver)
        return driver

    yield factory
    for d in made:
        d.settle()
    for close in closers:
        close(made[-1])
    for d in made:
        d.close()
    if "disk" in shared:
        shared["disk"].close()


class Origin:
    """A loader returning "v1", "v2", ... and taking ``duration`` fake seconds."""

    def __init__(self, clock: FakeClock, duration: float = 0.0) -> None:
        self.clock = clock
        self.duration = duration
        self.calls = 0
        self.fail_with: BaseException | None = None

    def __call__(self) -> str:
        self.calls += 1
        self.clock.advance(self.duration)
        if self.fail_with is not None:
            raise self.fail_with
        return f"v{self.calls}"


def test_miss_then_hit(make: Callable[..., Driver]) -> None:
    clock = FakeClock()
    d = make(ttl=10, clock=clock)
    origin = Origin(clock)
    assert d.get_or_load("k", origin) == "v1"
    assert d.get_or_load("k", origin) == "v1"
    s = d.cache.stats()
    assert (origin.calls, s.hits, s.misses, s.loads) == (1, 1, 1, 1)


def test_none_is_a_value(make: Callable[..., Driver]) -> None:
    d = make(ttl=10)
    calls = []
    assert d.get_or_load("k", lambda: calls.append(1)) is None
    assert d.get_or_load("k", lambda: calls.append(1)) is None
    assert calls == [1]


def test_expires_after_ttl(make: Callable[..., Driver]) -> None:
    clock = FakeClock()
    d = make(ttl=10, beta=0, clock=clock)
    origin = Origin(clock)
    d.get_or_load("k", origin)
    clock.advance(9.999)
    assert d.get_or_load("k", origin) == "v1"
    clock.advance(0.001)
    assert d.get_or_load("k", origin) == "v2"


def memory_only(d: Driver) -> None:
    """Scenarios that script random(): shared stores draw per process from the entry."""
    if not d.cache.backend.local:
        pytest.skip("shared stores derive the XFetch draw per process, not from random()")


def test_reads_never_draw_and_refresh_waits_for_its_point(make: Callable[..., Driver]) -> None:
    clock = FakeClock()
    draws = Draws(then=1.0)  # u = 0, clamped: the earliest refresh point there is
    d = make(ttl=10, beta=1.0, clock=clock, random=draws)
    memory_only(d)
    origin = Origin(clock, duration=0.1)
    d.get_or_load("k", origin)
    assert draws.count == 1  # one draw, when the value was stored
    clock.advance(10 - 0.1 * (1 + 20) - 0.01)  # just before delta * (1 + beta * XFETCH_CAP)
    for _ in range(100):
        assert d.get_or_load("k", origin) == "v1"
    assert draws.count == 1
    assert origin.calls == 1 and d.cache.stats().early_refreshes == 0
    clock.advance(0.01)
    assert d.get_or_load("k", origin) == "v1"
    d.settle()
    assert origin.calls == 2 and d.cache.stats().early_refreshes == 1


def test_refresh_point_never_before_half_the_ttl(make: Callable[..., Driver]) -> None:
    clock = FakeClock()
    d = make(ttl=10, beta=1.0, clock=clock, random=Draws(then=1.0))
    origin = Origin(clock, duration=8)  # a load far slower than the ttl allows for
    d.get_or_load("k", origin)
    clock.advance(4.99)
    assert d.get_or_load("k", origin) == "v1"
    d.settle()
    assert origin.calls == 1
    clock.advance(0.01)
    assert d.get_or_load("k", origin) == "v1"
    d.settle()
    assert origin.calls == 2


def test_xfetch_refreshes_near_expiry_in_background(make: Callable[..., Driver]) -> None:
    clock = FakeClock()
    d = make(ttl=10, beta=1.0, clock=clock, random=Draws(then=0.99))  # u = 0.01
    origin = Origin(clock, duration=0.1)
    d.get_or_load("k", origin)
    clock.advance(10 - 0.05)  # -ln(0.01) * 0.1 = 0.46 >= 0.05: refresh
    assert d.get_or_load("k", origin) == "v1"  # the reader keeps the current value
    d.settle()
    assert origin.calls == 2
    assert d.get_or_load("k", origin) == "v2"
    assert d.cache.stats().early_refreshes == 1


@pytest.mark.parametrize("draw, refreshes", [(0.0, 0), (1.0, 1)])
def test_extreme_draws_do_not_crash(
    make: Callable[..., Driver], draw: float, refreshes: int
) -> None:
    clock = FakeClock()
    d = make(ttl=10, beta=1.0, clock=clock, random=Draws(then=draw))
    memory_only(d)
    origin = Origin(clock, duration=0.1)
    d.get_or_load("k", origin)
    clock.advance(9.85)  # u = 1 refreshes from 0.1 s (delta) before expiry
    assert d.get_or_load("k", origin) == "v1"
    d.settle()
    assert d.cache.stats().early_refreshes == refreshes


def test_beta_zero_never_refreshes_early(make: Callable[..., Driver]) -> None:
    clock = FakeClock()
    d = make(ttl=10, beta=0, clock=clock, random=Draws(then=1.0))
    origin = Origin(clock, duration=5)
    d.get_or_load("k", origin)
    clock.advance(9.99)
    assert d.get_or_load("k", origin) == "v1"
    d.settle()
    assert origin.calls == 1


def test_failed_early_refresh_keeps_value_and_backs_off(make: Callable[..., Driver]) -> None:
    clock = FakeClock()
    d = make(ttl=100, beta=1.0, error_ttl=2, clock=clock, random=Draws(then=0.99))
    origin = Origin(clock, duration=20)
    d.get_or_load("k", origin)
    origin.fail_with = ConnectionError("origin down")
    origin.duration = 0.0  # the failing refresh must end while the value is still fresh
    # Past the refresh point whatever the draw (the lead is >= delta), 15 s before
    # expiry: a shared store keeps the entry rewritten now (with its backoff) for
    # the 15 s it has left, in real time; they must not run out before the next read.
    clock.advance(85)
    assert d.get_or_load("k", origin) == "v1"
    d.settle()
    assert origin.calls == 2
    # Backing off: more reads inside error_ttl start no refresh.
    assert d.get_or_load("k", origin) == "v1"
    d.settle()
    assert origin.calls == 2
    s = d.cache.stats()
    assert s.load_errors == 1 and s.early_refreshes == 1


def test_negative_caching_of_listed_errors(make: Callable[..., Driver]) -> None:
    clock = FakeClock()
    d = make(ttl=10, cache_errors=(LookupError,), error_ttl=5, clock=clock)
    origin = Origin(clock)
    origin.fail_with = KeyError("nope")
    with pytest.raises(KeyError) as first:
        d.get_or_load("k", origin)
    with pytest.raises(KeyError) as second:
        d.get_or_load("k", origin)
    assert first.value is not second.value  # a new instance per raise
    assert second.value.args == ("nope",)
    assert origin.calls == 1
    clock.advance(4.999)
    with pytest.raises(KeyError):
        d.get_or_load("k", origin)
    assert origin.calls == 1
    clock.advance(0.001)
    origin.fail_with = None
    assert d.get_or_load("k", origin) == "v2"  # exactly one retry after error_ttl
    s = d.cache.stats()
    assert (s.negative_hits, s.load_errors, s.loads) == (2, 1, 1)


def test_unlisted_errors_are_not_cached(make: Callable[..., Driver]) -> None:
    clock = FakeClock()
    d = make(ttl=10, cache_errors=(KeyError,), clock=clock)
    origin = Origin(clock)
    origin.fail_with = ValueError("transient")
    for _ in range(3):
        with pytest.raises(ValueError):
            d.get_or_load("k", origin)
    assert origin.calls == 3


def test_timeouts_are_never_negative_cached(make: Callable[..., Driver]) -> None:
    clock = FakeClock()
    d = make(ttl=10, cache_errors=(Exception,), clock=clock)
    origin = Origin(clock)
    origin.fail_with = TimeoutError("slow")
    for _ in range(2):
        with pytest.raises(TimeoutError):
            d.get_or_load("k", origin)
    assert origin.calls == 2


def test_predicate_cache_errors(make: Callable[..., Driver]) -> None:
    clock = FakeClock()
    d = make(ttl=10, cache_errors=lambda e: "404" in str(e), clock=clock)
    origin = Origin(clock)
    origin.fail_with = RuntimeError("HTTP 404")
    for _ in range(2):
        with pytest.raises(RuntimeError):
            d.get_or_load("k", origin)
    # In memory the error is cached. A shared store only keeps errors of the types
    # cache_errors names (a reader elsewhere could not rebuild others): not cached.
    assert origin.calls == (1 if d.cache.backend.local else 2)


def test_stale_while_revalidate(make: Callable[..., Driver]) -> None:
    clock = FakeClock()
    d = make(ttl=1, stale_ttl=10, beta=0, clock=clock)
    origin = Origin(clock)
    d.get_or_load("k", origin)
    clock.advance(5)
    assert d.get_or_load("k", origin) == "v1"  # stale, refresh started
    d.settle()
    assert d.get_or_load("k", origin) == "v2"
    assert d.cache.stats().stale_served == 1
    clock.advance(11.001)  # past ttl + stale_ttl: a plain miss
    assert d.get_or_load("k", origin) == "v3"


def test_stale_value_beats_a_cacheable_error(make: Callable[..., Driver]) -> None:
    clock = FakeClock()
    d = make(ttl=1, stale_ttl=10, beta=0, cache_errors=(KeyError,), error_ttl=3, clock=clock)
    origin = Origin(clock)
    d.get_or_load("k", origin)
    origin.fail_with = KeyError("gone")
    clock.advance(2)
    assert d.get_or_load("k", origin) == "v1"  # stale; background refresh fails
    d.settle()
    assert d.get_or_load("k", origin) == "v1"  # still the stale value, not the error
    d.settle()
    assert origin.calls == 2  # backed off for error_ttl
    clock.advance(3)
    assert d.get_or_load("k", origin) == "v1"  # retry in background, fails again
    d.settle()
    assert origin.calls == 3
    clock.advance(7)  # past stale_until: now the error is raised and cached
    with pytest.raises(KeyError):
        d.get_or_load("k", origin)
    with pytest.raises(KeyError):
        d.get_or_load("k", origin)
    assert origin.calls == 4


def test_get_set_invalidate(make: Callable[..., Driver]) -> None:
    clock = FakeClock()
    d = make(ttl=10, clock=clock)
    origin = Origin(clock)
    assert d.get("k", "default") == "default"
    d.set("k", "manual")
    assert d.get("k") == "manual"
    assert d.get_or_load("k", origin) == "manual" and origin.calls == 0
    d.set("short", "x", ttl=1)
    clock.advance(1)
    assert d.get("short") is None
    assert d.get("k") == "manual"
    d.invalidate("k")
    assert d.get("k") is None
    assert d.get_or_load("k", origin) == "v1"
    d.invalidate("never-set")  # no error


def test_get_does_not_raise_cached_errors(make: Callable[..., Driver]) -> None:
    d = make(ttl=10, cache_errors=(KeyError,))

    def fail() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        d.get_or_load("k", fail)
    assert d.get("k", "default") == "default"


def test_namespaces_do_not_collide_in_a_shared_store(make: Callable[..., Driver]) -> None:
    store: dict[Any, Any] = {}
    a = make(backend=store, namespace="a")
    b = make(backend=store, namespace="b")
    plain = make(backend=store)
    a.set("k", 1)
    b.set("k", 2)
    plain.set("k", 3)
    plain.set(("a", "k"), 4)
    assert (a.get("k"), b.get("k"), plain.get("k"), plain.get(("a", "k"))) == (1, 2, 3, 4)


def test_foreign_object_in_store_is_a_counted_miss(make: Callable[..., Driver]) -> None:
    store: dict[Any, Any] = {"k": "not an entry", "j": None}
    d = make(backend=store)
    assert d.get_or_load("k", lambda: "loaded") == "loaded"
    assert d.get_or_load("j", lambda: "loaded") == "loaded"
    assert d.cache.stats().serialization_errors == 1


@pytest.mark.parametrize(
    "store",
    [
        lambda: {},
        lambda: cachetools.LRUCache(maxsize=2),
        lambda: cachetools.TTLCache(maxsize=10, ttl=3600),
        lambda: cachetools.LFUCache(maxsize=10),
    ],
    ids=["dict", "LRUCache", "TTLCache", "LFUCache"],
)
def test_wraps_user_mappings_as_they_are(
    make: Callable[..., Driver], store: Callable[[], Any]
) -> None:
    mapping = store()
    d = make(backend=mapping, ttl=10)
    for key in "abc":
        assert d.get_or_load(key, lambda key=key: key.upper()) == key.upper()
    assert d.get_or_load("c", lambda: "again") == "C"
    assert 1 <= len(mapping) <= 3
    if isinstance(mapping, cachetools.LRUCache):
        assert "a" not in mapping  # the user's own maxsize still evicts


def test_store_write_failure_still_returns_the_value(make: Callable[..., Driver]) -> None:
    # cachetools refuses an item larger than maxsize with ValueError.
    mapping = cachetools.LRUCache(maxsize=1, getsizeof=lambda _: 2)
    d = make(backend=mapping)
    assert d.get_or_load("k", lambda: "v") == "v"
    assert d.cache.stats().backend_errors == 1
    assert len(mapping) == 0


def test_memory_url_and_maxsize(make: Callable[..., Driver]) -> None:
    d = make(backend="memory://?maxsize=2")
    for key in "abc":
        d.get_or_load(key, lambda: 1)
    assert len(d.cache.backend) == 2
