"""Section 5: one hot key expiring under load.

The key has a TTL of ``HOT_TTL`` and a loader that sleeps ``HOT_LOADER_S``. It
is loaded once (cold, not counted), then ``cfg.hot_workers`` threads (or
tasks) read it in a loop for ``cfg.hot_s`` seconds, sleeping ``cfg.think_s``
between two reads, so the key expires several times while it is being read.

Reported per variant: loader calls started in the window, reads that waited
for a load (a read that took at least ``WAITED_S``, half the loader's time),
reads served, and read latency. The think time keeps the workers from
fighting over the GIL: with 20 threads in a tight loop, a read that loses the
GIL mid-call waits for every other thread's 5 ms switch interval, ~100 ms,
and would count as a wait though no load was involved. The floor row (no
cache, no loads) shows how many slow reads the machine alone produces.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import functools
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

from _common import (
    KEY,
    Config,
    Target,
    Unavailable,
    disk_cache,
    find,
    percentile,
    progress,
    reason,
    table,
)

import stampede

HOT_TTL = 1.0  # seconds a loaded value is fresh
HOT_LOADER_S = 0.1  # the loader's duration
WAITED_S = HOT_LOADER_S / 2  # a read at least this slow waited for a load
MAX_LOADS = 6  # DESIGN.md: loader calls <= 6 in 5 s (and 0 reads waiting)
VALUE = "value"

# A build function receives the loader (sleeps HOT_LOADER_S, counts its calls)
# and returns a context manager that yields a zero-argument callable reading
# the hot key (an async callable for the task variants) and cleans up on exit.
ThreadBuild = Callable[[Callable[[], Any]], AbstractContextManager[Callable[[], Any]]]
TaskBuild = Callable[
    [Callable[[], Awaitable[Any]]], AbstractContextManager[Callable[[], Awaitable[Any]]]
]


@contextlib.contextmanager
def _floor(loader: Callable[[], Any]) -> Iterator[Callable[[], Any]]:
    # No cache and no load: every slow read in this row comes from the machine.
    yield lambda: VALUE


def _stampede(**options: Any) -> ThreadBuild:
    @contextlib.contextmanager
    def build(loader: Callable[[], Any]) -> Iterator[Callable[[], Any]]:
        @stampede.cached(ttl=HOT_TTL, **options)
        def f(key: str) -> Any:
            return loader()

        yield functools.partial(f, KEY)

    return build


def _cachetools(**kwargs: Any) -> ThreadBuild:
    @contextlib.contextmanager
    def build(loader: Callable[[], Any]) -> Iterator[Callable[[], Any]]:
        import cachetools

        @cachetools.cached(cachetools.TTLCache(16, HOT_TTL), **kwargs)
        def f(key: str) -> Any:
            return loader()

        yield functools.partial(f, KEY)

    return build


def _dogpile(background: bool) -> ThreadBuild:
    @contextlib.contextmanager
    def build(loader: Callable[[], Any]) -> Iterator[Callable[[], Any]]:
        from dogpile.cache import make_region

        def runner(region: Any, key: Any, creator: Callable[[], Any], mutex: Any) -> None:
            # dogpile's documented pattern: create in a thread, release the mutex after.
            def run() -> None:
                try:
                    region.set(key, creator())
                finally:
                    mutex.release()

            threading.Thread(target=run, daemon=True).start()

        region = make_region(async_creation_runner=runner if background else None)
        region.configure("dogpile.cache.memory", expiration_time=HOT_TTL)

        @region.cache_on_arguments()
        def f(key: str) -> Any:
            return loader()

        yield functools.partial(f, KEY)

    return build


@contextlib.contextmanager
def _diskcache_memoize(loader: Callable[[], Any]) -> Iterator[Callable[[], Any]]:
    with disk_cache() as cache:

        @cache.memoize(expire=HOT_TTL)
        def f(key: str) -> Any:
            return loader()

        yield functools.partial(f, KEY)


@contextlib.contextmanager
def _diskcache_memoize_stampede(loader: Callable[[], Any]) -> Iterator[Callable[[], Any]]:
    from diskcache import recipes

    memoize_stampede = getattr(recipes, "memoize_stampede", None)
    if memoize_stampede is None:
        raise Unavailable("this diskcache has no `recipes.memoize_stampede`")
    with disk_cache() as cache:

        @memoize_stampede(cache, expire=HOT_TTL)
        def f(key: str) -> Any:
            return loader()

        yield functools.partial(f, KEY)


STAMPEDE_HOT = "stampede `@cached(ttl=1, beta=1.0)` (XFetch early refresh)"
FLOOR_HOT = "floor: a plain function returning a constant (no cache, no loads)"

THREAD_CASES: list[tuple[str, ThreadBuild]] = [
    (STAMPEDE_HOT, _stampede(beta=1.0)),
    ("stampede `@cached(ttl=1, beta=0)` (single-flight only)", _stampede(beta=0.0)),
    (
        "stampede `@cached(ttl=1, beta=0, stale_ttl=1)` (stale-while-revalidate)",
        _stampede(beta=0.0, stale_ttl=1.0),
    ),
    ("cachetools `cached(TTLCache)`, lock", _cachetools(lock=threading.Lock())),
    ("cachetools `cached(TTLCache)`, condition", _cachetools(condition=threading.Condition())),
    ("dogpile memory region `@cache_on_arguments` (default)", _dogpile(background=False)),
    ("dogpile memory region, `async_creation_runner` (a thread)", _dogpile(background=True)),
    ("diskcache `memoize` (Cache in a temporary directory)", _diskcache_memoize),
    ("diskcache `recipes.memoize_stampede` (same)", _diskcache_memoize_stampede),
    (FLOOR_HOT, _floor),
]


@contextlib.contextmanager
def _astampede(loader: Callable[[], Awaitable[Any]]) -> Iterator[Callable[[], Awaitable[Any]]]:
    @stampede.cached(ttl=HOT_TTL, beta=1.0)
    async def f(key: str) -> Any:
        return await loader()

    yield functools.partial(f, KEY)


@contextlib.contextmanager
def _cashews_early(loader: Callable[[], Awaitable[Any]]) -> Iterator[Callable[[], Awaitable[Any]]]:
    import cashews

    cache = cashews.Cache()
    cache.setup("mem://")

    @cache.early(ttl=HOT_TTL)  # early_ttl: a third of the TTL by default
    async def f(key: str) -> Any:
        return await loader()

    yield functools.partial(f, KEY)


TASK_CASES: list[tuple[str, TaskBuild]] = [
    ("stampede `@cached(ttl=1, beta=1.0)` (async)", _astampede),
    ("cashews `@cache.early(ttl=1)` (mem://, refresh after 0.33 s)", _cashews_early),
]


@dataclasses.dataclass
class HotResult:
    label: str
    loads: int | None = None  # loader calls started in the window
    in_reader: int = 0  # those of them that a reader ran itself (not a background refresh)
    latencies: list[float] = dataclasses.field(default_factory=list)  # every read's, sorted
    errors: int = 0
    note: str = ""

    @property
    def waited(self) -> int | None:
        if self.loads is None:
            return None
        return len(self.latencies) - bisect.bisect_left(self.latencies, WAITED_S)

    def row(self) -> list[str]:
        if self.loads is None or not self.latencies:
            return [self.label, *["n/a"] * 8, self.note]
        lat = self.latencies

        def cell(seconds: float) -> str:
            return f"{seconds * 1e3:.2f}"

        return [
            self.label,
            str(self.loads),
            str(self.in_reader),
            f"{self.waited:,}",
            f"{len(lat):,}",
            cell(percentile(lat, 0.5)),
            cell(percentile(lat, 0.99)),
            cell(lat[-1]),
            str(self.errors),
            self.note,
        ]


class _Loads:
    """The loader's bookkeeping: when each call started, how many still run."""

    def __init__(self) -> None:
        self.starts: list[tuple[float, bool]] = []  # (when, called by a reader itself?)
        self.running = 0
        self.lock = threading.Lock()

    def begin(self, in_reader: bool) -> None:
        with self.lock:
            self.starts.append((time.perf_counter(), in_reader))
            self.running += 1

    def end(self) -> None:
        with self.lock:
            self.running -= 1

    def between(self, start: float, end: float) -> tuple[int, int]:
        """Loader calls started in ``[start, end)``: all, and those a reader made itself."""
        calls = [in_reader for t, in_reader in self.starts if start <= t < end]
        return len(calls), sum(calls)


def _finish(result: HotResult, loads: _Loads, start: float, end: float) -> None:
    result.loads, result.in_reader = loads.between(start, end)
    result.latencies.sort()


def _thread_trial(build: ThreadBuild, cfg: Config, result: HotResult) -> None:
    loads = _Loads()
    readers: set[int] = set()  # the workers' thread idents

    def loader() -> str:
        loads.begin(threading.get_ident() in readers)
        try:
            time.sleep(HOT_LOADER_S)
            return VALUE
        finally:
            loads.end()

    with build(loader) as call:
        if call() != VALUE:  # the cold load: before the window, not counted
            raise RuntimeError("wrong value returned")
        n = cfg.hot_workers
        barrier = threading.Barrier(n + 1)
        window = [0.0, 0.0]
        per_worker: list[list[float]] = [[] for _ in range(n)]
        errors: list[BaseException] = []

        def worker(out: list[float]) -> None:
            clock, sleep, think = time.perf_counter, time.sleep, cfg.think_s
            readers.add(threading.get_ident())
            barrier.wait()
            end = window[1]
            while (start := clock()) < end:
                try:
                    call()
                except Exception as exc:
                    errors.append(exc)
                out.append(clock() - start)
                if think:
                    sleep(think)

        threads = [threading.Thread(target=worker, args=(out,), daemon=True) for out in per_worker]
        for thread in threads:
            thread.start()
        window[0] = time.perf_counter()
        window[1] = window[0] + cfg.hot_s
        barrier.wait()
        for thread in threads:
            thread.join(cfg.hot_s + 30)
        hung = sum(thread.is_alive() for thread in threads)
        _wait_loads(loads)  # let a refresh still running finish before the cache goes
    for out in per_worker:
        result.latencies += out
    _finish(result, loads, *window)
    result.errors = len(errors)
    if hung:
        result.note = f"hung: {hung} workers still reading 30 s after the window"
    elif errors:
        result.note = f"first error: {reason(errors[0])}"


def _wait_loads(loads: _Loads, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while loads.running and time.monotonic() < deadline:
        time.sleep(0.005)


async def _task_trial(build: TaskBuild, cfg: Config, result: HotResult) -> None:
    loads = _Loads()
    readers: set[asyncio.Task[Any] | None] = set()  # the worker tasks

    async def loader() -> str:
        loads.begin(asyncio.current_task() in readers)
        try:
            await asyncio.sleep(HOT_LOADER_S)
            return VALUE
        finally:
            loads.end()

    with build(loader) as call:
        if await call() != VALUE:
            raise RuntimeError("wrong value returned")
        start = time.perf_counter()
        end = start + cfg.hot_s
        errors: list[BaseException] = []

        async def worker() -> None:
            clock, think, out = time.perf_counter, cfg.think_s, result.latencies
            while (began := clock()) < end:
                try:
                    await call()
                except Exception as exc:
                    errors.append(exc)
                out.append(clock() - began)
                await asyncio.sleep(think)

        workers = [asyncio.ensure_future(worker()) for _ in range(cfg.hot_workers)]
        readers.update(workers)
        await asyncio.wait_for(asyncio.gather(*workers), cfg.hot_s + 30)
        deadline = time.monotonic() + 5
        while loads.running and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
    _finish(result, loads, start, end)
    result.errors = len(errors)
    if errors:
        result.note = f"first error: {reason(errors[0])}"


def bench_hot(cfg: Config) -> list[HotResult]:
    results = []
    for label, build in THREAD_CASES:
        progress(f"hot key, threads: {label}")
        result = HotResult(label)
        try:
            _thread_trial(build, cfg, result)
        except Exception as exc:
            result = HotResult(label, note=reason(exc))
        results.append(result)

    async def tasks() -> None:
        for label, abuild in TASK_CASES:
            progress(f"hot key, tasks: {label}")
            result = HotResult(label)
            try:
                await _task_trial(abuild, cfg, result)
            except Exception as exc:
                result = HotResult(label, note=reason(exc))
            results.append(result)

    asyncio.run(tasks())
    return results


def report_hot(results: list[HotResult]) -> str:
    headers = [
        "variant",
        "loader calls",
        "of which run by a reader",
        f"waited for a load (read >= {WAITED_S * 1e3:g} ms)",
        "requests served",
        "p50 (ms)",
        "p99 (ms)",
        "max (ms)",
        "errors",
        "note",
    ]
    return table(headers, [r.row() for r in results])


def hot_note(cfg: Config) -> str:
    think = f"`time.sleep({cfg.think_s:g})`" if cfg.think_s else "no think time (tight loop)"
    return (
        f"{cfg.hot_workers} threads read the key in a loop for {cfg.hot_s:g} s with {think} "
        f"between reads (the task rows: {cfg.hot_workers} tasks, `asyncio.sleep`). The key is "
        "loaded once before the window (not counted); loader calls are those started in the "
        'window, and "run by a reader" those a reader\'s own thread (task) ran, not a '
        "background refresh. A caller waited for a load when its read took at least "
        f"{WAITED_S * 1e3:g} ms, half the loader's {HOT_LOADER_S * 1e3:g} ms: a hit takes "
        "microseconds, so only a read that blocked on a load (its own or another caller's) is "
        "that slow; the floor row counts the slow reads the machine makes on its own. "
        "Latencies are per read, over all reads of the window."
    )


def hot_targets(results: list[HotResult], cfg: Config) -> list[Target]:
    ours = find(results, STAMPEDE_HOT)
    floor = find(results, FLOOR_HOT)
    run = f"{cfg.hot_workers} workers, {cfg.hot_s:g} s"
    if cfg.quick:
        run += "; the target is for 20 workers, 5 s"
    context = "" if floor.waited is None else f" (floor row: {floor.waited})"
    return [
        Target(
            f"hot key expiring under load ({run}): callers that waited for a load",
            "0",
            "n/a" if ours.waited is None else f"{ours.waited}{context}",
            None if ours.waited is None else ours.waited == 0,
        ),
        Target(
            f"hot key expiring under load ({run}): loader calls",
            f"<= {MAX_LOADS}",
            "n/a" if ours.loads is None else str(ours.loads),
            None if ours.loads is None else ours.loads <= MAX_LOADS,
        ),
    ]
