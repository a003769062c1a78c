"""Sections 1 and 2: the cost of a memory hit of one cached key, sync and async.

Every row is timed in interleaved rounds and reports its minimum; ratios are to
``cachetools.cached(TTLCache, condition=...)`` (sync) and to aiocache's and
cashews' memory hits (async), the references of DESIGN.md section 4.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import threading
import time
import timeit
from collections.abc import Awaitable, Callable
from typing import Any

from _common import (
    CLEANUP,
    KEY,
    Config,
    Target,
    Unavailable,
    acounting,
    counting,
    disk_cache,
    find,
    ns,
    progress,
    ratio,
    reason,
    table,
)

import stampede

SYNC_TARGET = 0.25  # @cached sync hit <= 0.25x cachetools cached(TTLCache, condition=...)
FLOOR_TARGET = 3.0  # ... and <= 3x functools.lru_cache (the C floor): an aim (DESIGN section 4)
ASYNC_TARGET = 0.02  # @cached async hit <= 0.02x aiocache's and cashews' memory hits
FLOOR_REFERENCE = "`functools.lru_cache`"

SYNC_REFERENCE = "cachetools `cached(TTLCache)`, condition"
ASYNC_REFERENCES = ("aiocache `cached` (memory)", "cashews `@cache` (mem://)")
SYNC_DECORATOR = "stampede `@cached`"
NEAR_DECORATOR = "stampede `@cached(cache=diskcache.Cache, near_maxsize=1000)` (near hit)"
NEAR_TARGET = 1.5  # a near hit <= 1.5x a memory hit (DESIGN section 4)
ASYNC_NEAR_DECORATOR = (
    "stampede `@cached(cache=diskcache.Cache, near_maxsize=1000)` (async, near hit)"
)
ASYNC_DECORATOR = "stampede `@cached` (async)"
# What the targets use while `stampede.cached` does not exist:
SYNC_GET_OR_LOAD = "stampede `CoalescingCache().get_or_load` (bound method, default store)"
ASYNC_GET_OR_LOAD = "stampede `AsyncCoalescingCache().get_or_load` (bound method)"


# -- 1. hit cost, sync ----------------------------------------------------------------------

# A build function receives the source function ``src(x) -> x`` (it counts its
# calls) and returns ``(fn, args)``: ``fn(*args)`` is one hit of one key. Add a
# row by adding a function to SYNC_CASES.
Built = tuple[Callable[..., Any], tuple[Any, ...]]  # (fn, args): fn(*args) is one hit
SyncBuild = Callable[[Callable[[Any], Any]], Built]


def _plain(src: Callable[[Any], Any]) -> Built:
    def f(x: Any) -> Any:
        return x

    return f, (KEY,)


def _lru_cache(src: Callable[[Any], Any]) -> Built:
    return functools.lru_cache(maxsize=128)(src), (KEY,)


def _stampede_cached(src: Callable[[Any], Any]) -> Built:
    cached = getattr(stampede, "cached", None)
    if cached is None:
        raise Unavailable("`stampede.cached` does not exist yet")
    return cached(ttl=60)(src), (KEY,)


def _stampede_near(src: Callable[[Any], Any]) -> Built:
    # A near hit is the same code whatever the shared store: a folder needs no server.
    folder = CLEANUP.enter_context(disk_cache())
    return stampede.cached(cache=folder, ttl=60, near_maxsize=1000)(src), (KEY,)


def _stampede_get_or_load(src: Callable[[Any], Any], backend: Any = None) -> Built:
    cache: stampede.CoalescingCache[Any] = stampede.CoalescingCache(backend, ttl=60)
    return cache.get_or_load, (KEY, functools.partial(src, KEY))


def _stampede_get_or_load_dict(src: Callable[[Any], Any]) -> Built:
    return _stampede_get_or_load(src, {})


def _stampede_wrapped(src: Callable[[Any], Any]) -> Built:
    # The least a decorator adds: one Python frame that passes the key on.
    get_or_load = stampede.CoalescingCache(ttl=60).get_or_load
    loader = functools.partial(src, KEY)

    def f(x: Any) -> Any:
        return get_or_load(x, loader)

    return f, (KEY,)


def _cachetools(**kwargs: Any) -> SyncBuild:
    def build(src: Callable[[Any], Any]) -> Built:
        import cachetools

        return cachetools.cached(cachetools.TTLCache(4096, 60), **kwargs)(src), (KEY,)

    return build


def _cachebox(src: Callable[[Any], Any]) -> Built:
    import cachebox

    return cachebox.cached(cachebox.LRUCache(4096))(src), (KEY,)


def _dogpile_region() -> Any:
    from dogpile.cache import make_region

    return make_region().configure("dogpile.cache.memory", expiration_time=60)


def _dogpile_get_or_create(src: Callable[[Any], Any]) -> Built:
    return _dogpile_region().get_or_create, (KEY, functools.partial(src, KEY))


def _dogpile_decorator(src: Callable[[Any], Any]) -> Built:
    @_dogpile_region().cache_on_arguments()
    def f(x: Any) -> Any:
        return src(x)

    return f, (KEY,)


# (label, build, caches: does it cache, i.e. must src run only once?)
def _diskcache_memoize(src: Callable[[Any], Any]) -> Built:
    cache = CLEANUP.enter_context(disk_cache())
    return cache.memoize(expire=60)(src), (KEY,)


def _diskcache_memoize_stampede(src: Callable[[Any], Any]) -> Built:
    from diskcache import recipes

    memoize_stampede = getattr(recipes, "memoize_stampede", None)
    if memoize_stampede is None:
        raise Unavailable("this diskcache has no `recipes.memoize_stampede`")
    cache = CLEANUP.enter_context(disk_cache())
    return memoize_stampede(cache, expire=60)(src), (KEY,)


SYNC_CASES: list[tuple[str, SyncBuild, bool]] = [
    ("plain function call", _plain, False),
    (FLOOR_REFERENCE, _lru_cache, True),
    (SYNC_DECORATOR, _stampede_cached, True),
    (SYNC_GET_OR_LOAD, _stampede_get_or_load, True),
    (NEAR_DECORATOR, _stampede_near, True),
    ("stampede `CoalescingCache({}).get_or_load` (dict store)", _stampede_get_or_load_dict, True),
    (
        "stampede `get_or_load` behind a one-line `def f(x)` (decorator floor)",
        _stampede_wrapped,
        True,
    ),
    ("cachetools `cached(TTLCache)`, no lock", _cachetools(), True),
    ("cachetools `cached(TTLCache)`, lock", _cachetools(lock=threading.Lock()), True),
    (SYNC_REFERENCE, _cachetools(condition=threading.Condition()), True),
    ("cachebox `cached(LRUCache)`", _cachebox, True),
    ("dogpile memory region `get_or_create`", _dogpile_get_or_create, True),
    ("dogpile memory region `@cache_on_arguments`", _dogpile_decorator, True),
    ("diskcache `memoize` (Cache in a temporary directory)", _diskcache_memoize, True),
    ("diskcache `recipes.memoize_stampede` (same)", _diskcache_memoize_stampede, True),
]


@dataclasses.dataclass
class HitResult:
    label: str
    seconds: float | None  # per call; None when not measured
    note: str = ""
    # per call, each round's (rounds interleave the rows: round i of two rows ran
    # moments apart, so their ratio in one round is spared the machine's drift)
    rounds: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Row:
    """A hit row being measured: ``run(number)`` times ``number`` calls."""

    result: HitResult
    run: Callable[[int], Any]  # returns seconds (sync) or an awaitable of seconds (async)
    calls: list[int]  # the source's call count
    caches: bool
    number: int = 0

    def record(self, elapsed: float) -> None:
        seconds = elapsed / self.number
        self.result.rounds.append(seconds)
        old = self.result.seconds
        self.result.seconds = seconds if old is None else min(old, seconds)

    def check(self) -> None:
        if self.caches and self.calls[0] > 1:
            self.result.note = f"source ran {self.calls[0]} times: not a pure hit"


def _number(elapsed: float, number: int, cfg: Config) -> int:
    return max(1, int(number * cfg.repeat_s / elapsed))


def _sync_timer(fn: Callable[..., Any], args: tuple[Any, ...]) -> Callable[[int], float]:
    names = [f"a{i}" for i in range(len(args))]
    namespace = {"fn": fn, **dict(zip(names, args, strict=True))}
    return timeit.Timer(f"fn({', '.join(names)})", globals=namespace).timeit


def bench_hit_sync(cfg: Config) -> list[HitResult]:
    """Time every row in rounds, so drift of the machine touches all rows alike."""
    with CLEANUP:  # the rows' temporary directories go when the section is done
        return _bench_hit_sync(cfg)


def _bench_hit_sync(cfg: Config) -> list[HitResult]:
    results, rows = [], []
    for label, build, caches in SYNC_CASES:
        progress(f"sync hit: {label}")
        result = HitResult(label, None)
        results.append(result)
        src, calls = counting(lambda x: x)
        try:
            fn, args = build(src)
            if fn(*args) != KEY:
                raise RuntimeError("wrong value returned")
            row = _Row(result, _sync_timer(fn, args), calls, caches)
            number, elapsed = 16, 0.0
            while elapsed < cfg.repeat_s / 5:  # calibrate
                number *= 2
                elapsed = row.run(number)
            row.number = _number(elapsed, number, cfg)
        except Exception as exc:
            result.note = reason(exc)
            continue
        rows.append(row)
    for i in range(cfg.rounds):
        progress(f"sync hit: round {i + 1} of {cfg.rounds}")
        for row in rows:
            row.record(row.run(row.number))
    for row in rows:
        row.check()
    return results


def report_hit_sync(results: list[HitResult]) -> str:
    reference = next((r.seconds for r in results if r.label == SYNC_REFERENCE), None)
    rows = [[r.label, ns(r.seconds), ratio(r.seconds, reference), r.note] for r in results]
    return table(["variant", "ns per hit", "vs cachetools condition", "note"], rows)


# -- 2. hit cost, async ---------------------------------------------------------------------

AsyncBuild = Callable[[Callable[[Any], Awaitable[Any]]], Built]


def _async_plain(src: Callable[[Any], Awaitable[Any]]) -> Built:
    async def f(x: Any) -> Any:
        return x

    return f, (KEY,)


def _async_stampede_cached(src: Callable[[Any], Awaitable[Any]]) -> Built:
    cached = getattr(stampede, "cached", None)
    if cached is None:
        raise Unavailable("`stampede.cached` does not exist yet")
    return cached(ttl=60)(src), (KEY,)


def _async_stampede_get_or_load(src: Callable[[Any], Awaitable[Any]]) -> Built:
    cache: stampede.AsyncCoalescingCache[Any] = stampede.AsyncCoalescingCache(ttl=60)
    return cache.get_or_load, (KEY, functools.partial(src, KEY))


def _async_stampede_near(src: Callable[[Any], Awaitable[Any]]) -> Built:
    folder = CLEANUP.enter_context(disk_cache())
    return stampede.cached(cache=folder, ttl=60, near_maxsize=1000)(src), (KEY,)


def _aiocache(src: Callable[[Any], Awaitable[Any]]) -> Built:
    import aiocache

    return aiocache.cached(ttl=60, namespace="bench-hit")(src), (KEY,)


def _cashews(**kwargs: Any) -> AsyncBuild:
    def build(src: Callable[[Any], Awaitable[Any]]) -> Built:
        import cashews

        cache = cashews.Cache()
        cache.setup("mem://")
        return cache(ttl=60, **kwargs)(src), (KEY,)

    return build


ASYNC_CASES: list[tuple[str, AsyncBuild, bool]] = [
    ("plain `async def` await", _async_plain, False),
    (ASYNC_DECORATOR, _async_stampede_cached, True),
    (ASYNC_GET_OR_LOAD, _async_stampede_get_or_load, True),
    (ASYNC_NEAR_DECORATOR, _async_stampede_near, True),
    (ASYNC_REFERENCES[0], _aiocache, True),
    (ASYNC_REFERENCES[1], _cashews(), True),
    ("cashews `@cache(protected=False)` (mem://)", _cashews(protected=False), True),
]


async def _await_loop(fn: Callable[..., Any], args: tuple[Any, ...], number: int) -> float:
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if len(args) == 1:
            (a,) = args
            start = time.perf_counter()
            for _ in range(number):
                await fn(a)
        else:
            a, b = args
            start = time.perf_counter()
            for _ in range(number):
                await fn(a, b)
        return time.perf_counter() - start
    finally:
        if gc_was_enabled:
            gc.enable()


async def _bench_hit_async(cfg: Config) -> list[HitResult]:
    results, rows = [], []
    for label, build, caches in ASYNC_CASES:
        progress(f"async hit: {label}")
        result = HitResult(label, None)
        results.append(result)

        async def identity(x: Any) -> Any:
            return x

        src, calls = acounting(identity)
        try:
            fn, args = build(src)
            if await fn(*args) != KEY:
                raise RuntimeError("wrong value returned")
            row = _Row(result, functools.partial(_await_loop, fn, args), calls, caches)
            number, elapsed = 8, 0.0
            while elapsed < cfg.repeat_s / 5:  # calibrate
                number *= 2
                elapsed = await row.run(number)
            row.number = _number(elapsed, number, cfg)
        except Exception as exc:
            result.note = reason(exc)
            continue
        rows.append(row)
    for i in range(cfg.rounds):
        progress(f"async hit: round {i + 1} of {cfg.rounds}")
        for row in rows:
            row.record(await row.run(row.number))
    for row in rows:
        row.check()
    return results


def bench_hit_async(cfg: Config) -> list[HitResult]:
    return asyncio.run(_bench_hit_async(cfg))


def report_hit_async(results: list[HitResult]) -> str:
    refs = [next((r.seconds for r in results if r.label == ref), None) for ref in ASYNC_REFERENCES]
    rows = [
        [r.label, ns(r.seconds), *(ratio(r.seconds, ref) for ref in refs), r.note] for r in results
    ]
    return table(["variant", "ns per hit", "vs aiocache", "vs cashews", "note"], rows)


def _near_target(flavour: str, rows: list[HitResult], memory: str, near: str) -> Target:
    """DESIGN section 4: a near-cache hit within ``NEAR_TARGET`` of a memory hit."""
    mem_s, near_s = find(rows, memory).seconds, find(rows, near).seconds
    value = None if mem_s is None or near_s is None else near_s / mem_s
    return Target(
        f"near-cache hit, {flavour}, vs a memory hit (`@cached`, both)",
        f"<= {NEAR_TARGET}x",
        "n/a" if value is None else f"{value:.2f}x ({ns(near_s)} vs {ns(mem_s)} ns)",
        None if value is None else value <= NEAR_TARGET,
    )


def hit_targets(sync: list[HitResult], asyn: list[HitResult]) -> list[Target]:
    targets = []
    ref = find(sync, SYNC_REFERENCE).seconds
    ours = find(sync, SYNC_DECORATOR)
    via = "`@cached`"
    if ours.seconds is None:  # no decorator yet: the bound get_or_load stands in
        ours, via = find(sync, SYNC_GET_OR_LOAD), "`get_or_load` (no `@cached` yet)"
    value = None if ours.seconds is None or not ref else ours.seconds / ref
    targets.append(
        Target(
            "memory hit, sync, vs cachetools `cached(TTLCache, condition)`",
            f"<= {SYNC_TARGET}x",
            "n/a" if value is None else f"{value:.2f}x via {via}",
            None if value is None else value <= SYNC_TARGET,
        )
    )
    floor = find(sync, FLOOR_REFERENCE).seconds
    value = None if ours.seconds is None or not floor else ours.seconds / floor
    targets.append(
        Target(
            "memory hit, sync, vs `functools.lru_cache` (the C floor)",
            f"<= {FLOOR_TARGET:g}x",
            "n/a" if value is None else f"{value:.1f}x via {via}",
            None if value is None else value <= FLOOR_TARGET,
        )
    )
    targets.append(_near_target("sync", sync, SYNC_DECORATOR, NEAR_DECORATOR))
    targets.append(_near_target("async", asyn, ASYNC_DECORATOR, ASYNC_NEAR_DECORATOR))
    ours = find(asyn, ASYNC_DECORATOR)
    via = "`@cached`"
    if ours.seconds is None:
        ours, via = find(asyn, ASYNC_GET_OR_LOAD), "`get_or_load` (no `@cached` yet)"
    for peer, label in zip(("aiocache", "cashews"), ASYNC_REFERENCES, strict=True):
        ref = find(asyn, label).seconds
        value = None if ours.seconds is None or not ref else ours.seconds / ref
        targets.append(
            Target(
                f"memory hit, async, vs {peer}",
                f"<= {ASYNC_TARGET}x",
                "n/a" if value is None else f"{value:.3f}x via {via}",
                None if value is None else value <= ASYNC_TARGET,
            )
        )
    return targets
