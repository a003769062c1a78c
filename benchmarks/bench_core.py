#!/usr/bin/env python
"""Core benchmarks of stampede against its peers, side by side, in one process run.

Sections (DESIGN.md section 4):

1. hit cost, sync: ns per memory hit of one key, ratio to
   ``cachetools.cached(TTLCache, condition=...)``;
2. hit cost, async: ns per awaited memory hit, ratio to aiocache's ``cached``;
3. cold key, threads: N threads behind a barrier ask for one missing key whose
   loader sleeps 50 ms: loader calls and caller latency beyond the loader;
4. cold key, asyncio: the same with N tasks and an ``asyncio.sleep`` loader.

Prints markdown tables and a final "targets" table (PASS/MISS). Timing never
fails the run: the exit status is 0 whatever the numbers.

    python benchmarks/bench_core.py [--quick] [--only hit|cold]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import gc
import importlib.metadata
import math
import os
import platform
import sys
import threading
import time
import timeit
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

# Measure the checkout this script lives in, not another installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import stampede

PEERS = ("cachetools", "cachebox", "dogpile.cache", "aiocache", "cashews")
LOADER_S = 0.05  # the cold-key loader's duration
KEY = "bench-key"

SYNC_TARGET = 0.33  # @cached sync hit <= 0.33x cachetools cached(TTLCache, condition=...)
ASYNC_TARGET = 0.1  # @cached async hit <= 0.1x aiocache's and cashews' memory hits
P99_SLACK_S = 0.005  # cold key: p99 caller latency <= loader + 5 ms

SYNC_REFERENCE = "cachetools `cached(TTLCache)`, condition"
ASYNC_REFERENCES = ("aiocache `cached` (memory)", "cashews `@cache` (mem://)")
SYNC_DECORATOR = "stampede `@cached`"
ASYNC_DECORATOR = "stampede `@cached` (async)"
# What the targets use while `stampede.cached` does not exist:
SYNC_GET_OR_LOAD = "stampede `CoalescingCache().get_or_load` (bound method, default store)"
ASYNC_GET_OR_LOAD = "stampede `AsyncCoalescingCache().get_or_load` (bound method)"


class Unavailable(Exception):
    """A variant that cannot be measured here (not installed, not implemented yet)."""


@dataclasses.dataclass(frozen=True)
class Config:
    quick: bool
    rounds: int  # timed rounds over all hit rows; each row's minimum is reported
    repeat_s: float  # seconds one timed repeat of one row should last
    threads: int  # callers of the cold-key thread test
    tasks: int  # callers of the cold-key asyncio test
    thread_trials: int  # cold-key trials per variant (threads are noisy: more of them)
    task_trials: int
    cap_s: float  # wall-clock cap for all the trials of one asyncio variant
    join_s: float  # how long a thread trial may run before it counts as hung

    @classmethod
    def make(cls, quick: bool) -> Config:
        if quick:
            return cls(True, 3, 0.01, 200, 2_000, 1, 1, 5.0, 10.0)
        return cls(False, 7, 0.1, 1_000, 10_000, 5, 3, 10.0, 30.0)


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def reason(exc: BaseException) -> str:
    if isinstance(exc, Unavailable):
        return str(exc)
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def ns(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e9:,.0f}"


def ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:+.1f}"


def ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "n/a"
    return f"{value / reference:.2f}x"


def counting(fn: Callable[..., Any]) -> tuple[Callable[..., Any], list[int]]:
    """``fn`` wrapped to count its calls in the returned one-item list."""
    calls = [0]

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        calls[0] += 1
        return fn(*args)

    return wrapper, calls


def acounting(fn: Callable[..., Awaitable[Any]]) -> tuple[Callable[..., Any], list[int]]:
    calls = [0]

    @functools.wraps(fn)
    async def wrapper(*args: Any) -> Any:
        calls[0] += 1
        return await fn(*args)

    return wrapper, calls


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


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
SYNC_CASES: list[tuple[str, SyncBuild, bool]] = [
    ("plain function call", _plain, False),
    ("`functools.lru_cache`", _lru_cache, True),
    (SYNC_DECORATOR, _stampede_cached, True),
    (SYNC_GET_OR_LOAD, _stampede_get_or_load, True),
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
]


@dataclasses.dataclass
class HitResult:
    label: str
    seconds: float | None  # per call; None when not measured
    note: str = ""


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


# -- 3. cold key, threads -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RawTrial:
    """What one cold-key trial saw, before any statistics."""

    load_ends: list[float]  # perf_counter() at the end of each loader call
    spans: list[tuple[float, float]]  # each caller's call: (start, end); empty if it broke
    errors: int
    note: str


@dataclasses.dataclass(frozen=True)
class Trial:
    loads: int
    p50: float  # caller latency percentiles, seconds beyond the loader's duration
    p99: float
    max: float
    overlapped: int  # callers whose call began before the first load had finished
    errors: int
    seconds: float  # wall-clock time the trial took


@dataclasses.dataclass
class ColdResult:
    label: str
    trials: list[Trial] = dataclasses.field(default_factory=list)
    note: str = ""

    def add(self, raw: RawTrial, seconds: float) -> None:
        ordered = sorted(end - start - LOADER_S for start, end in raw.spans)
        p50, p99 = percentile(ordered, 0.5), percentile(ordered, 0.99)
        first_done = min(raw.load_ends, default=math.inf)
        overlapped = sum(start < first_done for start, _ in raw.spans)
        self.trials.append(
            Trial(len(raw.load_ends), p50, p99, ordered[-1], overlapped, raw.errors, seconds)
        )

    @property
    def loads(self) -> int | None:
        """The worst loader-call count over the trials."""
        return max((t.loads for t in self.trials), default=None)

    @property
    def typical(self) -> Trial | None:
        """The median trial by p99 (thread scheduling makes single trials noisy)."""
        ordered = sorted(self.trials, key=lambda t: t.p99)
        return ordered[(len(ordered) - 1) // 2] if ordered else None

    def p99_range(self) -> str:
        if not self.trials:
            return "n/a"
        p99s = [t.p99 for t in self.trials]
        return f"{ms(min(p99s))} .. {ms(max(p99s))}"


# A build function receives the loader (sleeps LOADER_S, counts its calls) and
# returns a zero-argument callable that asks for the one missing key.
ThreadBuild = Callable[[Callable[[], Any]], Callable[[], Any]]


def _cold_stampede(loader: Callable[[], Any]) -> Callable[[], Any]:
    return functools.partial(stampede.CoalescingCache(ttl=60).get_or_load, KEY, loader)


def _cold_stampede_cached(loader: Callable[[], Any]) -> Callable[[], Any]:
    cached = getattr(stampede, "cached", None)
    if cached is None:
        raise Unavailable("`stampede.cached` does not exist yet")

    @cached(ttl=60)
    def f(key: str) -> Any:
        return loader()

    return functools.partial(f, KEY)


def _cold_cachetools(**kwargs: Any) -> ThreadBuild:
    def build(loader: Callable[[], Any]) -> Callable[[], Any]:
        import cachetools

        @cachetools.cached(cachetools.TTLCache(16, 60), **kwargs)
        def f(key: str) -> Any:
            return loader()

        return functools.partial(f, KEY)

    return build


def _cold_cachebox(loader: Callable[[], Any]) -> Callable[[], Any]:
    import cachebox

    @cachebox.cached(cachebox.LRUCache(16))
    def f(key: str) -> Any:
        return loader()

    return functools.partial(f, KEY)


def _cold_floor_threads(loader: Callable[[], Any]) -> Callable[[], Any]:
    # The least a thread single-flight can do: a lock, a dict of events, a store.
    lock = threading.Lock()
    flights: dict[str, tuple[threading.Event, list[Any]]] = {}
    store: dict[str, Any] = {}

    def call() -> Any:
        if KEY in store:
            return store[KEY]
        with lock:
            flight = flights.get(KEY)
            lead = flight is None
            if flight is None:
                flight = flights[KEY] = (threading.Event(), [])
        event, box = flight
        if lead:
            box.append(loader())
            store[KEY] = box[0]
            event.set()
        else:
            event.wait()
        return box[0]

    return call


THREAD_CASES: list[tuple[str, ThreadBuild]] = [
    ("stampede `CoalescingCache.get_or_load`", _cold_stampede),
    (SYNC_DECORATOR, _cold_stampede_cached),
    ("cachetools `cached`, condition", _cold_cachetools(condition=threading.Condition())),
    ("cachetools `cached`, lock", _cold_cachetools(lock=threading.Lock())),
    ("cachebox `cached(LRUCache)`", _cold_cachebox),
    ("floor: minimal lock + dict + Event single-flight", _cold_floor_threads),
]
STAMPEDE_THREADS = THREAD_CASES[0][0]
FLOOR_THREADS = THREAD_CASES[-1][0]


def _thread_trial(build: ThreadBuild, cfg: Config) -> RawTrial:
    load_ends: list[float] = []

    def loader() -> str:
        time.sleep(LOADER_S)
        load_ends.append(time.perf_counter())  # list.append is atomic
        return "value"

    call = build(loader)
    n = cfg.threads
    barrier = threading.Barrier(n)
    spans = [(0.0, 0.0)] * n
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            barrier.wait(cfg.join_s)
        except threading.BrokenBarrierError:
            return
        start = time.perf_counter()
        try:
            call()
        except BaseException as exc:
            errors.append(exc)
        spans[i] = (start, time.perf_counter())

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + cfg.join_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    hung = sum(thread.is_alive() for thread in threads)
    if hung:
        barrier.abort()
        note = f"hung: {hung} threads still waiting after {cfg.join_s:g} s"
        return RawTrial(load_ends, [], len(errors), note)
    note = f"first error: {reason(errors[0])}" if errors else ""
    return RawTrial(load_ends, spans, len(errors), note)


def bench_cold_threads(cfg: Config) -> list[ColdResult]:
    results = []
    for label, build in THREAD_CASES:
        progress(f"cold threads: {label}")
        result = ColdResult(label)
        for _ in range(cfg.thread_trials):
            began = time.perf_counter()
            try:
                raw = _thread_trial(build, cfg)
            except Exception as exc:
                result.note = reason(exc)
                break
            if not raw.spans:  # hung: later trials would pile up on it
                result.note = (
                    f"{raw.note} ({len(raw.load_ends)} loader calls done); "
                    f"trials kept: {len(result.trials)}"
                )
                break
            result.add(raw, time.perf_counter() - began)
            result.note = result.note or raw.note
        results.append(result)
    return results


def report_cold(results: list[ColdResult], callers: str) -> str:
    rows = []
    for r in results:
        t = r.typical
        rows.append(
            [
                r.label,
                "n/a" if r.loads is None else str(r.loads),
                "n/a" if t is None else f"{t.overlapped:,}",
                *(["n/a"] * 3 if t is None else [ms(t.p50), ms(t.p99), ms(t.max)]),
                r.p99_range(),
                str(sum(t.errors for t in r.trials)),
                str(len(r.trials)),
                r.note,
            ]
        )
    headers = [
        f"variant ({callers})",
        "loader calls (worst)",
        "overlapped the load",
        "p50 (ms)",
        "p99 (ms)",
        "max (ms)",
        "p99 range (ms)",
        "errors",
        "trials",
        "note",
    ]
    return table(headers, rows)


# -- 4. cold key, asyncio -------------------------------------------------------------------

TaskBuild = Callable[[Callable[[], Awaitable[Any]]], Callable[[], Awaitable[Any]]]


def _cold_astampede(loader: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
    return functools.partial(stampede.AsyncCoalescingCache(ttl=60).get_or_load, KEY, loader)


def _cold_astampede_cached(loader: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
    cached = getattr(stampede, "cached", None)
    if cached is None:
        raise Unavailable("`stampede.cached` does not exist yet")

    @cached(ttl=60)
    async def f(key: str) -> Any:
        return await loader()

    return functools.partial(f, KEY)


def _cold_aiocache(stampede_lease: float | None) -> TaskBuild:
    def build(loader: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
        import aiocache

        if stampede_lease is None:
            decorator = aiocache.cached(ttl=60, namespace="bench-cold")
        else:
            decorator = aiocache.cached_stampede(
                lease=stampede_lease, ttl=60, namespace="bench-cold-stampede"
            )

        @decorator
        async def f(key: str) -> Any:
            return await loader()

        return functools.partial(f, KEY)

    return build


def _cold_cashews(loader: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
    import cashews

    cache = cashews.Cache()
    cache.setup("mem://")

    @cache(ttl=60)
    async def f(key: str) -> Any:
        return await loader()

    return functools.partial(f, KEY)


def _cold_floor_tasks(loader: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
    # The least a task single-flight can do: a dict of tasks, awaited directly
    # (no shielding, no cleanup, no store).
    flights: dict[str, asyncio.Future[Any]] = {}

    async def call() -> Any:
        flight = flights.get(KEY)
        if flight is None:
            flight = flights[KEY] = asyncio.ensure_future(loader())
        return await flight

    return call


TASK_CASES: list[tuple[str, TaskBuild]] = [
    ("stampede `AsyncCoalescingCache.get_or_load`", _cold_astampede),
    (ASYNC_DECORATOR, _cold_astampede_cached),
    ("aiocache `cached` (memory)", _cold_aiocache(None)),
    ("aiocache `cached_stampede` (memory, lease 2 s)", _cold_aiocache(2)),
    ("cashews `@cache` (mem://)", _cold_cashews),
    ("floor: minimal dict of tasks, awaited directly", _cold_floor_tasks),
]
STAMPEDE_TASKS = TASK_CASES[0][0]
FLOOR_TASKS = TASK_CASES[-1][0]


async def _task_trial(build: TaskBuild, cfg: Config, budget: float) -> RawTrial:
    load_ends: list[float] = []

    async def loader() -> str:
        await asyncio.sleep(LOADER_S)
        load_ends.append(time.perf_counter())
        return "value"

    call = build(loader)
    n = cfg.tasks
    gate = asyncio.Event()
    spans = [(0.0, 0.0)] * n
    errors: list[BaseException] = []

    async def one(i: int) -> None:
        await gate.wait()
        start = time.perf_counter()
        try:
            await call()
        except Exception as exc:
            errors.append(exc)
        spans[i] = (start, time.perf_counter())

    tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
    await asyncio.sleep(0)  # every task reaches the gate
    gate.set()
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, budget))
    if pending:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return RawTrial(load_ends, [], len(errors), f"ran into the {cfg.cap_s:g} s cap")
    note = f"first error: {reason(errors[0])}" if errors else ""
    return RawTrial(load_ends, spans, len(errors), note)


async def _bench_cold_tasks(cfg: Config) -> list[ColdResult]:
    results = []
    for label, build in TASK_CASES:
        progress(f"cold tasks: {label}")
        result = ColdResult(label)
        deadline = time.monotonic() + cfg.cap_s
        for i in range(cfg.task_trials):
            left = deadline - time.monotonic()
            if result.trials and left < 1.5 * result.trials[-1].seconds:
                result.note = f"stopped after {i} trials: {cfg.cap_s:g} s cap"
                break
            began = time.perf_counter()
            try:
                raw = await _task_trial(build, cfg, left)
            except Exception as exc:
                result.note = reason(exc)
                break
            if not raw.spans:
                result.note = (
                    f"trial {i + 1} {raw.note} ({len(raw.load_ends)} loader calls done); "
                    f"trials kept: {len(result.trials)}"
                )
                break
            result.add(raw, time.perf_counter() - began)
            result.note = result.note or raw.note
        results.append(result)
    return results


def bench_cold_tasks(cfg: Config) -> list[ColdResult]:
    return asyncio.run(_bench_cold_tasks(cfg))


# -- machine, targets, main -----------------------------------------------------------------


def machine() -> str:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    rows = [
        ["python", f"{platform.python_implementation()} {platform.python_version()}"],
        ["cpus", f"{os.cpu_count()} (usable: {usable})"],
        ["platform", platform.platform()],
        ["stampede", f"{stampede.__version__} ({Path(stampede.__file__).parent})"],
    ]
    for name in PEERS:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        rows.append([name, version])
    return table(["", ""], rows)


@dataclasses.dataclass
class Target:
    what: str
    target: str
    measured: str
    ok: bool | None  # None: not measured

    def row(self) -> list[str]:
        verdict = "n/a" if self.ok is None else "PASS" if self.ok else "MISS"
        return [self.what, self.target, self.measured, verdict]


def _find(results: Sequence[Any], label: str) -> Any:
    return next(r for r in results if r.label == label)


def hit_targets(sync: list[HitResult], asyn: list[HitResult]) -> list[Target]:
    targets = []
    ref = _find(sync, SYNC_REFERENCE).seconds
    ours = _find(sync, SYNC_DECORATOR)
    via = "`@cached`"
    if ours.seconds is None:  # no decorator yet: the bound get_or_load stands in
        ours, via = _find(sync, SYNC_GET_OR_LOAD), "`get_or_load` (no `@cached` yet)"
    value = None if ours.seconds is None or not ref else ours.seconds / ref
    targets.append(
        Target(
            "memory hit, sync, vs cachetools `cached(TTLCache, condition)`",
            f"<= {SYNC_TARGET}x",
            "n/a" if value is None else f"{value:.2f}x via {via}",
            None if value is None else value <= SYNC_TARGET,
        )
    )
    ours = _find(asyn, ASYNC_DECORATOR)
    via = "`@cached`"
    if ours.seconds is None:
        ours, via = _find(asyn, ASYNC_GET_OR_LOAD), "`get_or_load` (no `@cached` yet)"
    for peer, label in zip(("aiocache", "cashews"), ASYNC_REFERENCES, strict=True):
        ref = _find(asyn, label).seconds
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


def cold_targets(result: ColdResult, floor: ColdResult, callers: str) -> list[Target]:
    typical = result.typical
    base = floor.typical
    context = "" if base is None else f"; floor row: {ms(base.p99)}"
    return [
        Target(
            f"cold key, {callers}: loader calls",
            "1",
            "n/a" if result.loads is None else f"{result.loads} (worst of {len(result.trials)})",
            None if result.loads is None else result.loads == 1,
        ),
        Target(
            f"cold key, {callers}: p99 caller latency (median trial)",
            f"<= loader + {P99_SLACK_S * 1e3:g} ms",
            "n/a"
            if typical is None
            else f"loader {ms(typical.p99)} ms (trials: {result.p99_range()}{context})",
            None if typical is None else typical.p99 <= P99_SLACK_S,
        ),
    ]


COLD_NOTE = (
    "Latency: from each caller's own call to its return, minus the loader's {loader:g} ms "
    "(negative: the caller arrived after the load had started or finished). "
    '"Overlapped the load": callers whose call began before the first load finished; the '
    "rest were plain hits. Those columns and p50/p99/max come from the median trial by p99 "
    "of {trials}; loader calls from the worst trial. The floor row is the least any "
    "single-flight can cost here: waking the callers."
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts (CI smoke run)")
    parser.add_argument("--only", choices=("hit", "cold"), help="run one half only")
    args = parser.parse_args(argv)
    cfg = Config.make(args.quick)
    began = time.perf_counter()

    def emit(text: str) -> None:
        print(text, flush=True)

    mode = "quick" if cfg.quick else "full"
    emit(f"# stampede core benchmarks ({mode} run)\n")
    emit(machine() + "\n")
    targets: list[Target] = []

    if args.only in (None, "hit"):
        sync = bench_hit_sync(cfg)
        emit("## 1. Memory hit, sync (one key, already cached)\n")
        emit(report_hit_sync(sync) + "\n")
        emit(
            f"Each row: the minimum of {cfg.rounds} rounds of ~{cfg.repeat_s:g} s; rounds "
            "interleave the rows. Includes the loop's own overhead (see the plain call row).\n"
        )
        asyn = bench_hit_async(cfg)
        emit("## 2. Memory hit, async (awaited in a loop inside one coroutine)\n")
        emit(report_hit_async(asyn) + "\n")
        targets += hit_targets(sync, asyn)

    if args.only in (None, "cold"):
        callers = f"{cfg.threads:,} threads"
        threads = bench_cold_threads(cfg)
        emit(f"## 3. Cold key, {callers}, {LOADER_S * 1e3:g} ms `time.sleep` loader\n")
        emit(report_cold(threads, callers) + "\n")
        emit(COLD_NOTE.format(trials=cfg.thread_trials, loader=LOADER_S * 1e3) + "\n")
        targets += cold_targets(
            _find(threads, STAMPEDE_THREADS), _find(threads, FLOOR_THREADS), callers
        )

        callers = f"{cfg.tasks:,} tasks"
        tasks = bench_cold_tasks(cfg)
        emit(f"## 4. Cold key, {callers}, {LOADER_S * 1e3:g} ms `asyncio.sleep` loader\n")
        emit(report_cold(tasks, callers) + "\n")
        emit(
            COLD_NOTE.format(trials=cfg.task_trials, loader=LOADER_S * 1e3)
            + f" The trials of one variant are capped at {cfg.cap_s:g} s in all.\n"
        )
        targets += cold_targets(_find(tasks, STAMPEDE_TASKS), _find(tasks, FLOOR_TASKS), callers)

    emit("## Targets (DESIGN.md section 4)\n")
    emit(table(["what", "target", "measured", "verdict"], [t.row() for t in targets]) + "\n")
    emit(
        "Not covered here: Redis hit, hot-key expiry under load, multi-process Redis "
        "cold key, XFetch + lease refreshes per expiry.\n"
    )
    emit(f"Total run time: {time.perf_counter() - began:.1f} s.")
    return 0  # timing never fails the run


if __name__ == "__main__":
    sys.exit(main())
