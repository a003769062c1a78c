"""Section 8: one hot key read by several processes through Redis, refreshed at expiry.

DESIGN.md section 4: "XFetch + lease at expiry: 1.0 refresh per expiry (plain
XFetch gives e^(1/beta))".

4 worker processes (2 in ``--quick``; multiprocessing, spawn; started once
for the section and reused by every variant) each run ``READERS`` threads
(asyncio tasks for cashews) that read one hot key in a loop for 5 s (2 s),
against a private ``redis-server``
(``tests.support.redis_server.RedisServer``). The key has a TTL of 1 s and
a 100 ms loader; the processes' warm-up reads just before the window load it
(not counted), so it expires (or is refreshed ahead of its expiry) several
times inside the window.

Every loader call records its start on ``time.monotonic`` (one clock for all
the processes of the machine) and whether a reader ran it itself (a
foreground load) or a background refresh did; the processes send their
records back at the end of the window, and the counts are made over all of
them. A *refresh round* is one renewal of the key's value: a loader call that
starts more than ``ROUND_GAP_S`` (two loader times) after the first call of
the current round opens the next round, so calls that start within it are
duplicates of the same renewal. stampede never refreshes a value before half
its TTL has passed (0.5 s here), so two genuine renewals are always further
apart than that; cashews refreshes every 0.33 s, also further apart.
*Refreshes per expiry* is loader calls / rounds; the target is 1.0 (and the
worst round's count is 1).

A read that took at least half the loader's time (``WAITED_S``) waited for a
load; those that overlapped a loader call of any process are counted apart
(a read slow with no load running was slowed by the machine, as on the
floor row). Redis commands are the private server's ``INFO commandstats``
delta over the window (it includes the commands Lua scripts run inside
Redis: stampede's read is one ``EVALSHA`` that runs ``GET`` + ``PTTL``, 3
counted).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import importlib.util
import multiprocessing
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from _common import Config, Target, Unavailable, percentile, progress, reason, table

TTL = 1.0
LOADER_S = 0.1
WAITED_S = LOADER_S / 2  # a read at least this slow waited for a load
ROUND_GAP_S = 2 * LOADER_S  # loader calls starting within this of a round's first: one round
READERS = 10  # threads (tasks) per process
START_LEAD_S = 0.2  # between "go" and the window's start: every process is ready by then
DRAIN_S = 2.0  # after the window, how long a worker lets a running load finish
ANSWER_S = 20.0  # how long a worker may take to answer, beyond the window
SPAWN_S = 30.0  # how long the workers may take to start and build a variant
VALUE = "hot value"

STAMPEDE_LEASE = "stampede `@cached(cache=redis, ttl=1, distributed=True)` (XFetch + lease)"
STAMPEDE_LOCAL = "stampede `@cached(cache=redis, ttl=1)` (XFetch in each process, no lease)"
STAMPEDE_SWR = (
    "stampede `@cached(cache=redis, ttl=1, distributed=True, beta=0, stale_ttl=1)` "
    "(lease + stale-while-revalidate, no XFetch)"
)
STAMPEDE_NEAR = (
    "stampede `@cached(cache=redis, ttl=1, distributed=True, near_maxsize=1000)` "
    "(XFetch + lease + near cache)"
)
STAMPEDE_MEMORY = "stampede `@cached(ttl=1)` on its in-process store (each process for itself)"
FLOOR = "floor: raw redis-py `GET` of a key (no cache, no loads)"
CSC_FLOOR = (
    "redis-py client-side cache: raw `GET` on a `protocol=3, cache_config=CacheConfig()` "
    "client (no loads)"
)

# label, builder name (built in each worker), modules it needs, async?
VARIANTS: list[tuple[str, str, tuple[str, ...], bool]] = [
    (STAMPEDE_LEASE, "stampede_lease", ("redis",), False),
    (STAMPEDE_LOCAL, "stampede_local", ("redis",), False),
    (STAMPEDE_SWR, "stampede_swr", ("redis",), False),
    (STAMPEDE_NEAR, "stampede_near", ("redis",), False),
    (STAMPEDE_MEMORY, "stampede_memory", (), False),
    (
        "dogpile redis region `distributed_lock=True` (threads)",
        "dogpile",
        ("redis", "dogpile.cache"),
        False,
    ),
    (
        "cashews redis `@cache.early(ttl=1)` (tasks; refresh after 0.33 s, `SET NX` lock)",
        "cashews",
        ("redis", "cashews"),
        True,
    ),
    (
        "cashews redis `@cache.early(ttl=1)`, `client_side=True` (tasks)",
        "cashews_client_side",
        ("redis", "cashews"),
        True,
    ),
    (FLOOR, "floor", ("redis",), False),
    (CSC_FLOOR, "csc_floor", ("redis",), False),
]


def processes(cfg: Config) -> int:
    return 2 if cfg.quick else 4


def window_s(cfg: Config) -> float:
    return 2.0 if cfg.quick else 5.0


# -- the variants, built inside each worker process ---------------------------------------


def _stampede(url: str, load: Callable[[], Any], **options: Any) -> Callable[[str], Any]:
    import redis

    import stampede

    client = redis.Redis.from_url(url)

    def value(key: str) -> Any:
        return load()

    cached: Callable[[str], Any] = stampede.cached(cache=client, ttl=TTL, **options)(value)
    return cached


def _dogpile(url: str, load: Callable[[], Any]) -> Callable[[str], Any]:
    from dogpile.cache import make_region

    region = make_region().configure(
        "dogpile.cache.redis",
        expiration_time=TTL,
        arguments={
            "url": url,
            # Redis keeps the value past dogpile's own expiry, so that the other
            # readers serve it while one regenerates (dogpile's dogpile lock).
            "redis_expiration_time": int(TTL) + 10,  # whole seconds (SETEX)
            "distributed_lock": True,
            "thread_local_lock": False,  # dogpile warns otherwise with a distributed lock
        },
    )

    def value(key: str) -> Any:
        return load()

    cached: Callable[[str], Any] = region.cache_on_arguments()(value)
    return cached


def _cashews(url: str, aload: Callable[[], Any], **options: Any) -> Callable[[str], Any]:
    import cashews

    cache = cashews.Cache()
    cache.setup(url, **options)

    @cache.early(ttl=TTL)  # early_ttl: a third of the TTL by default
    async def value(key: str) -> Any:
        return await aload()

    return value


def _memory(load: Callable[[], Any]) -> Callable[[str], Any]:
    import stampede

    def value(key: str) -> Any:
        return load()

    cached: Callable[[str], Any] = stampede.cached(ttl=TTL)(value)
    return cached


def _floor(url: str, **options: Any) -> Callable[[str], Any]:
    import redis

    if options.get("protocol") == 3:
        from redis.cache import CacheConfig

        options["cache_config"] = CacheConfig()
    client = redis.Redis.from_url(url, **options)

    def value(key: str) -> Any:
        return client.get(key)

    return value


class _Loads:
    """The loader's bookkeeping in one process: when each call ran, who ran it."""

    def __init__(self) -> None:
        self.done: list[tuple[float, float, bool]] = []  # (start, end, run by a reader?)
        self.running = 0
        self.lock = threading.Lock()
        self.readers: set[Any] = set()  # reader thread idents, or reader tasks

    def begin(self, who: Any) -> tuple[float, bool]:
        with self.lock:
            self.running += 1
        return time.monotonic(), who in self.readers  # on one clock for every process

    def end(self, began: tuple[float, bool]) -> None:
        with self.lock:
            self.done.append((began[0], time.monotonic(), began[1]))
            self.running -= 1


def _build(name: str, url: str, loads: _Loads) -> Callable[[str], Any]:
    def load() -> str:
        began = loads.begin(threading.get_ident())
        try:
            time.sleep(LOADER_S)
            return VALUE
        finally:
            loads.end(began)

    async def aload() -> str:
        began = loads.begin(asyncio.current_task())
        try:
            await asyncio.sleep(LOADER_S)
            return VALUE
        finally:
            loads.end(began)

    if name == "stampede_lease":
        return _stampede(url, load, distributed=True)
    if name == "stampede_local":
        return _stampede(url, load)
    if name == "stampede_swr":
        return _stampede(url, load, distributed=True, beta=0.0, stale_ttl=TTL)
    if name == "stampede_near":
        return _stampede(url, load, distributed=True, near_maxsize=1000)
    if name == "stampede_memory":
        return _memory(load)
    if name == "dogpile":
        return _dogpile(url, load)
    if name == "cashews":
        return _cashews(url, aload)
    if name == "cashews_client_side":
        return _cashews(url, aload, client_side=True)
    if name == "floor":
        return _floor(url)
    if name == "csc_floor":
        return _floor(url, protocol=3)
    raise ValueError(name)


# -- the worker process -------------------------------------------------------------------


@dataclasses.dataclass
class _Report:
    """What one process sends back after a window."""

    loads: list[tuple[float, float, bool]]  # (start, end, run by a reader?)
    latencies: list[float]  # every read's, seconds
    slow: list[tuple[float, float]]  # (start, end) of the reads that took >= WAITED_S
    errors: int
    first_error: str
    hung: int  # readers still reading long after the window


def _drain(loads: _Loads) -> None:
    deadline = time.monotonic() + DRAIN_S
    while loads.running and time.monotonic() < deadline:
        time.sleep(0.005)


def _run_threads(
    fn: Callable[[str], Any], key: str, loads: _Loads, start: float, end: float, think: float
) -> _Report:
    per_reader: list[list[float]] = [[] for _ in range(READERS)]
    slow: list[tuple[float, float]] = []
    errors: list[BaseException] = []

    def reader(out: list[float]) -> None:
        clock, sleep = time.monotonic, time.sleep
        loads.readers.add(threading.get_ident())
        sleep(max(0.0, start - clock()))
        while (began := clock()) < end:
            try:
                fn(key)
            except Exception as exc:
                errors.append(exc)
            ended = clock()
            out.append(ended - began)
            if ended - began >= WAITED_S:
                slow.append((began, ended))
            if think:
                sleep(think)

    threads = [threading.Thread(target=reader, args=(out,), daemon=True) for out in per_reader]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, end - time.monotonic()) + ANSWER_S / 2)
    hung = sum(t.is_alive() for t in threads)
    _drain(loads)
    latencies = [x for out in per_reader for x in out]
    first = reason(errors[0]) if errors else ""
    return _Report(list(loads.done), latencies, slow, len(errors), first, hung)


async def _run_tasks(
    fn: Callable[[str], Any], key: str, loads: _Loads, start: float, end: float, think: float
) -> _Report:
    latencies: list[float] = []
    slow: list[tuple[float, float]] = []
    errors: list[BaseException] = []

    async def reader() -> None:
        clock = time.monotonic
        await asyncio.sleep(max(0.0, start - clock()))
        while (began := clock()) < end:
            try:
                await fn(key)
            except Exception as exc:
                errors.append(exc)
            ended = clock()
            latencies.append(ended - began)
            if ended - began >= WAITED_S:
                slow.append((began, ended))
            await asyncio.sleep(think)

    tasks = [asyncio.ensure_future(reader()) for _ in range(READERS)]
    loads.readers.update(tasks)
    _, pending = await asyncio.wait(tasks, timeout=end - time.monotonic() + ANSWER_S / 2)
    for task in pending:
        task.cancel()
    deadline = time.monotonic() + DRAIN_S
    while loads.running and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    first = reason(errors[0]) if errors else ""
    return _Report(list(loads.done), latencies, slow, len(errors), first, len(pending))


def _session(name: str, is_async: bool, url: str, key: str, think: float, conn: Any) -> None:
    """One variant in this process: build, warm up, say ready, read through the window."""
    loads = _Loads()
    if not is_async:
        fn = _build(name, url, loads)
        fn(key)  # warm-up: connections, scripts, and the key's first load (not counted)
        conn.send(("ready", None))
        _, start, end = conn.recv()
        conn.send(("done", _run_threads(fn, key, loads, start, end, think)))
        return

    async def run() -> None:
        fn = _build(name, url, loads)
        await fn(key)
        conn.send(("ready", None))
        _, start, end = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        conn.send(("done", await _run_tasks(fn, key, loads, start, end, think)))

    asyncio.run(run())


def _worker(url: str, think: float, conn: Any) -> None:
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message[0] == "stop":
            return
        _, name, is_async, key = message
        try:
            _session(name, is_async, url, key, think, conn)
        except Exception as exc:
            conn.send(("error", reason(exc)))


class _Fleet:
    """The worker processes, started on first use; killed and restarted after a failure."""

    def __init__(self, n: int, url: str, think: float) -> None:
        self.n, self.url, self.think = n, url, think
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: list[Any] = []
        self.pipes: list[Any] = []

    def start(self) -> None:
        if self.procs:
            return
        for _ in range(self.n):
            mine, theirs = self.ctx.Pipe()
            proc = self.ctx.Process(
                target=_worker, args=(self.url, self.think, theirs), daemon=True
            )
            proc.start()
            theirs.close()
            self.procs.append(proc)
            self.pipes.append(mine)

    def send(self, message: tuple[Any, ...]) -> None:
        for pipe in self.pipes:
            pipe.send(message)

    def receive(self, kind: str, deadline: float) -> list[Any]:
        out = []
        for pipe in self.pipes:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError("a worker process did not answer in time")
            got, payload = pipe.recv()
            if got == "error":
                raise Unavailable(f"n/a: {payload}")
            if got != kind:
                raise RuntimeError(f"unexpected message {got!r}")
            out.append(payload)
        return out

    def stop(self, graceful: bool = True) -> None:
        if graceful:
            for pipe in self.pipes:
                with contextlib.suppress(Exception):  # the process is gone already
                    pipe.send(("stop",))
        for proc in self.procs:
            proc.join(2.0 if graceful else 0.0)
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
        for pipe in self.pipes:
            pipe.close()
        self.procs, self.pipes = [], []


# -- counting commands --------------------------------------------------------------------


class _Commands:
    """``INFO commandstats`` deltas of the private server, minus the observer's own."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.before: Counter[str] = Counter()
        self.own: Counter[str] = Counter()
        self.start()
        self.own = self._stats() - self.before  # one INFO: what a measurement costs

    def _stats(self) -> Counter[str]:
        info = self.client.info("commandstats")
        return Counter({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()})

    def start(self) -> None:
        self.before = self._stats()

    def stop(self) -> Counter[str]:
        return self._stats() - self.before - self.own


# -- results ------------------------------------------------------------------------------


@dataclasses.dataclass
class RefreshResult:
    label: str
    # (start, end, run by a reader?) of the loader calls started in the window
    loads: list[tuple[float, float, bool]] = dataclasses.field(default_factory=list)
    rounds: list[int] = dataclasses.field(default_factory=list)  # loader calls per round
    latencies: list[float] = dataclasses.field(default_factory=list)  # sorted
    during_load: int = 0  # reads >= WAITED_S that overlapped a loader call (any process)
    errors: int = 0
    commands: Counter[str] | None = None
    measured: bool = False
    note: str = ""

    @property
    def per_expiry(self) -> float | None:
        return len(self.loads) / len(self.rounds) if self.rounds else None

    @property
    def period(self) -> float | None:
        """Mean seconds between the starts of two rounds."""
        firsts, at = [], 0
        for size in self.rounds:
            firsts.append(self.loads[at][0])
            at += size
        return (firsts[-1] - firsts[0]) / (len(firsts) - 1) if len(firsts) > 1 else None

    @property
    def waited(self) -> int:
        return len(self.latencies) - bisect.bisect_left(self.latencies, WAITED_S)


@dataclasses.dataclass
class RefreshResults:
    rows: list[RefreshResult]
    server: str
    processes: int
    window_s: float
    think_s: float


def rounds_of(starts: list[float]) -> list[int]:
    """Loader calls per refresh round, for ascending start times."""
    rounds: list[int] = []
    first = -float("inf")
    for t in starts:
        if t - first > ROUND_GAP_S:
            first = t
            rounds.append(0)
        rounds[-1] += 1
    return rounds


def _run_variant(
    fleet: _Fleet, label: str, name: str, is_async: bool, counter: _Commands, window: float
) -> RefreshResult:
    result = RefreshResult(label)
    key = f"refresh:{uuid.uuid4().hex[:8]}:{name}"
    try:
        fleet.start()
        fleet.send(("build", name, is_async, key))
        fleet.receive("ready", time.monotonic() + SPAWN_S)
        start = time.monotonic() + START_LEAD_S
        end = start + window
        fleet.send(("go", start, end))
        time.sleep(max(0.0, start - time.monotonic()))
        counter.start()
        time.sleep(max(0.0, end - time.monotonic()))
        result.commands = counter.stop()
        reports: list[_Report] = fleet.receive("done", end + ANSWER_S + DRAIN_S)
    except Exception as exc:
        text = reason(exc)
        result.note = text if text.startswith("n/a") else f"n/a: {text}"
        fleet.stop(graceful=False)  # a later variant starts fresh workers
        return result
    every = sorted(load for r in reports for load in r.loads)
    result.loads = [load for load in every if start <= load[0] < end]
    result.rounds = rounds_of([t for t, _, _ in result.loads])
    result.latencies = sorted(x for r in reports for x in r.latencies)
    result.during_load = sum(
        any(a < load_end and load_start < b for load_start, load_end, _ in every)
        for r in reports
        for a, b in r.slow
    )
    result.errors = sum(r.errors for r in reports)
    result.measured = True
    notes = []
    hung = sum(r.hung for r in reports)
    if hung:
        notes.append(f"{hung} readers still reading {ANSWER_S / 2:g} s after the window")
    first = next((r.first_error for r in reports if r.first_error), "")
    if first:
        notes.append(f"first error: {first}")
    result.note = "; ".join(notes)
    return result


def _missing(modules: tuple[str, ...]) -> str | None:
    for module in modules:
        try:
            if importlib.util.find_spec(module) is None:
                return module
        except ModuleNotFoundError:
            return module
    return None


def bench_refresh(cfg: Config) -> RefreshResults:
    n, window = processes(cfg), window_s(cfg)
    try:
        import redis

        from tests.support.redis_server import RedisServer

        server = RedisServer()
        server.start()
    except Exception as exc:
        text = reason(exc)
        note = text if text.startswith("n/a") else f"n/a: {text}"
        progress(f"refresh: no private Redis server ({note})")
        rows = [RefreshResult(v[0], note=note) for v in VARIANTS]
        return RefreshResults(rows, note, n, window, cfg.think_s)
    rows = []
    fleet = _Fleet(n, server.url, cfg.think_s)
    try:
        client = redis.Redis.from_url(server.url)
        try:
            version = f"redis-server {client.info('server')['redis_version']}"
            counter = _Commands(client)
            for label, name, modules, is_async in VARIANTS:
                missing = _missing(modules)
                if missing:
                    rows.append(RefreshResult(label, note=f"n/a (not installed: {missing})"))
                    continue
                progress(f"refresh: {label}")
                rows.append(_run_variant(fleet, label, name, is_async, counter, window))
        finally:
            client.close()
    except Exception as exc:  # the section's own setup failed: the rows not run are n/a
        text = reason(exc)
        done = {r.label for r in rows}
        rows += [RefreshResult(v[0], note=f"n/a: {text}") for v in VARIANTS if v[0] not in done]
        version = f"n/a: {text}"
    finally:
        fleet.stop()
        server.stop()
    return RefreshResults(rows, version, n, window, cfg.think_s)


# -- report -------------------------------------------------------------------------------


def _per_s(r: RefreshResult, results: RefreshResults) -> str:
    if r.commands is None:
        return "n/a"
    total = sum(r.commands.values())
    per = total / results.processes / results.window_s
    top = ", ".join(
        f"{n / results.processes / results.window_s:,.0f} {name.upper()}"
        for name, n in r.commands.most_common(3)
    )
    return f"{per:,.0f} ({top})" if top else f"{per:,.0f}"


def report_refresh(results: RefreshResults) -> str:
    rows = []
    for r in results.rows:
        if not r.measured:
            rows.append([r.label, *["n/a"] * 11, r.note])
            continue
        lat = r.latencies
        period = r.period
        per = r.per_expiry
        reads = len(lat)
        commands = sum(r.commands.values()) if r.commands is not None else 0
        rows.append(
            [
                r.label,
                str(len(r.loads)),
                str(sum(mine for _, _, mine in r.loads)),
                str(len(r.rounds)),
                "n/a" if per is None else f"{per:.2f}",
                str(max(r.rounds, default=0)),
                "n/a" if period is None else f"{period:.2f}",
                f"{r.waited:,} ({r.during_load:,} during a load)",
                f"{reads:,}",
                f"{percentile(lat, 0.99) * 1e3:.2f} / {lat[-1] * 1e3:.1f}" if lat else "n/a",
                _per_s(r, results),
                f"{commands / reads:.1f}" if reads and r.commands is not None else "n/a",
                (f"{r.errors} errors; " if r.errors else "") + r.note,
            ]
        )
    return table(
        [
            "variant",
            "loader calls",
            "of which run by a reader",
            "refresh rounds (expiries)",
            "refreshes per expiry",
            "most in one round",
            "s between rounds",
            f"waited for a load (read >= {WAITED_S * 1e3:g} ms)",
            "reads served",
            "p99 / max read (ms)",
            "Redis commands per process per s (most run)",
            "commands per read",
            "note",
        ],
        rows,
    )


def refresh_title(results: RefreshResults) -> str:
    return (
        f"Hot key across processes: refreshes per expiry (Redis): {results.processes} "
        f"processes x {READERS} threads, {results.window_s:g} s, TTL {TTL:g} s, "
        f"{LOADER_S * 1e3:g} ms loader"
    )


def refresh_note(results: RefreshResults) -> str:
    think = f"`time.sleep({results.think_s:g})`" if results.think_s else "no think time"
    return (
        f"{results.processes} processes (multiprocessing, spawn) x {READERS} reader threads "
        f"(the cashews row: {READERS} asyncio tasks per process) read one key in a loop for "
        f"{results.window_s:g} s with {think} between reads, against a private "
        f"{results.server}. TTL {TTL:g} s, {LOADER_S * 1e3:g} ms loader (`time.sleep`; "
        "cashews `asyncio.sleep`); the processes' warm-up reads just before the window load the "
        "key (not counted). Loader calls are those started in the window, all processes "
        'together (each process records its calls and sends them back); "run by a reader": '
        "in a reader's own thread (task), i.e. a foreground load, not a background refresh. "
        "A refresh round is one renewal of the value: loader calls starting within "
        f"{ROUND_GAP_S * 1e3:g} ms of the round's first call are duplicates of it (a value is "
        "never renewed twice that fast: stampede refreshes no earlier than half the TTL, "
        "cashews after a third of it). Refreshes per expiry: loader calls / rounds (target "
        "1.0); *s between rounds*: how often the value was renewed (XFetch renews ahead of "
        "the TTL, so below 1 s). A read waited for a load when it took at least "
        f"{WAITED_S * 1e3:g} ms (in brackets: those whose time overlapped a loader call in any "
        "process; the others were slowed by the machine alone, as the floor row's are). "
        "Commands: the server's `INFO commandstats` delta over the window (commands a Lua "
        "script runs inside Redis count too; a stampede read is 2, `GETRANGE` + `PTTL` sent "
        "together, and concurrent reads of the key in one process share one), per process "
        "per second and per read. The near-cache row keeps copies in each process (served "
        "with no I/O until an announced write drops them, or 5 s); the in-process row is each "
        "process's own memory store (one load per process per expiry: its p99 is the near "
        "row's target); the redis-py client-side cache row is a raw `GET` on a RESP3 client "
        "with `CacheConfig()` (server-assisted tracking; no loads)."
    )


def near_targets(results: RefreshResults) -> list[Target]:
    """DESIGN.md section 4's hot-key row with the near cache on."""
    what = f"near cache, hot key ({results.processes} processes x {READERS} readers)"
    row = next((r for r in results.rows if r.label == STAMPEDE_NEAR and r.measured), None)
    memory = next((r for r in results.rows if r.label == STAMPEDE_MEMORY and r.measured), None)
    floor = next((r for r in results.rows if r.label == FLOOR and r.measured), None)
    if row is None or row.commands is None or not row.latencies:
        why = "n/a" if row is None else (row.note or "not measured")
        return [Target(f"{what}: Redis commands per read", "<= 0.01", why, None)]
    per_read = sum(row.commands.values()) / len(row.latencies)
    p99 = percentile(row.latencies, 0.99) * 1e3
    targets = [
        Target(
            f"{what}: Redis commands per read",
            "<= 0.01",
            f"{per_read:.4f} ({sum(row.commands.values()):,} commands / "
            f"{len(row.latencies):,} reads)",
            per_read <= 0.01,
        )
    ]
    if memory is not None and memory.latencies:
        mp99 = percentile(memory.latencies, 0.99) * 1e3
        targets.append(
            Target(
                f"{what}: read p99 <= the in-process store's row",
                f"<= {mp99:.2f} ms",
                f"{p99:.2f} ms",
                p99 <= mp99,
            )
        )
    if row.rounds:
        per = row.per_expiry
        assert per is not None
        targets.append(
            Target(
                f"{what}: refreshes per expiry",
                "1.0",
                f"{per:.2f} ({len(row.loads)} calls / {len(row.rounds)} rounds)",
                max(row.rounds) == 1,
            )
        )
    context = f" (floor row: {floor.waited})" if floor is not None else ""
    targets.append(
        Target(
            f"{what}: reads that waited for a load",
            "0 beyond the floor row's",
            f"{row.waited}{context}",
            row.waited <= (floor.waited if floor is not None else 0),
        )
    )
    return targets


def refresh_targets(results: RefreshResults) -> list[Target]:
    what = f"XFetch + lease at expiry ({results.processes} processes, {results.window_s:g} s)"
    row = next((r for r in results.rows if r.label == STAMPEDE_LEASE), None)
    if row is None or not row.measured or not row.rounds:
        why = "n/a" if row is None else (row.note or "no refresh in the window")
        return [
            Target(f"{what}: refreshes per expiry", "1.0", why, None),
            Target(f"{what}: callers that waited for a load", "0", why, None),
        ]
    per = row.per_expiry
    assert per is not None
    worst = max(row.rounds)
    floor = next((r for r in results.rows if r.label == FLOOR and r.measured), None)
    context = f" (floor row: {floor.waited})" if floor is not None else ""
    return [
        Target(
            f"{what}: refreshes per expiry (loader calls / refresh rounds)",
            "1.0",
            f"{per:.2f} ({len(row.loads)} calls / {len(row.rounds)} rounds; most in one "
            f"round: {worst})",
            worst == 1,
        ),
        Target(
            f"{what}: callers that waited for a load",
            "0",
            f"{row.waited}{context}",
            row.waited == 0,
        ),
    ]
