"""Sections 3 and 4: a cold key asked for by many threads, or many tasks, at once.

Every caller waits behind a barrier (or an event) for the same missing key,
whose loader sleeps ``LOADER_S``. Reported: loader calls, and each caller's
latency beyond the loader, next to a "floor" row: the least any single-flight
costs on this machine (waking that many callers).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from _common import KEY, Config, Target, Unavailable, ms, percentile, progress, reason, table
from _hit import ASYNC_DECORATOR, SYNC_DECORATOR

import stampede

LOADER_S = 0.05  # the cold-key loader's duration
P99_SLACK_S = 0.005  # cold key: p99 caller latency <= loader + 5 ms


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
