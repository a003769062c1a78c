"""Section 7: one cold key asked for by several processes at once, through Redis.

DESIGN.md section 4: "4 processes x 25 callers, Redis, cold key: 1 loader call;
p99 <= loader + 15 ms; <= 5 Redis commands per process per flight".

Per variant, 4 worker processes (multiprocessing, spawn) are started once and
build the variant against a private ``redis-server``
(``tests.support.redis_server.RedisServer``). Each trial uses a fresh key:
every worker readies its 25 callers (threads, or asyncio tasks for the async
peers), all processes and this one meet at a ``multiprocessing.Barrier``, and
the callers are released together. Each caller times its own call. The loader
sleeps 100 ms and counts its calls in a ``multiprocessing.Value`` (no Redis
command). Redis commands are the ``INFO commandstats`` delta of the private
server around the trial, minus the observer's own (measured on an empty
trial); the server's slow log, set to record every command, tells the
commands clients sent (round trips) from those a Lua script ran inside Redis.
A first, unreported trial warms each process's connections and scripts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import multiprocessing
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from _common import Config, Target, Unavailable, ms, percentile, progress, reason, table

PROCESSES = 4
CALLERS = 25
LOADER_S = 0.1
TTL = 60
P99_SLACK_S = 0.015  # p99 <= loader + 15 ms
MAX_COMMANDS = 5  # Redis commands per process per flight
VARIANT_S = 60.0  # wall-clock bound of one variant (start, warm-up, trials)
BARRIER_S = 30.0  # how long one process waits for the others at a trial's start

STAMPEDE_DISTRIBUTED = "stampede `@cached(cache=redis, distributed=True)` (threads)"
STAMPEDE_LOCAL = "stampede `@cached(cache=redis, distributed=False)` (threads)"

# label, builder name (built in each worker), modules it needs, async?
VARIANTS: list[tuple[str, str, tuple[str, ...], bool]] = [
    (STAMPEDE_DISTRIBUTED, "stampede_distributed", ("redis",), False),
    (STAMPEDE_LOCAL, "stampede_local", ("redis",), False),
    (
        "dogpile redis region `distributed_lock=True` (threads)",
        "dogpile",
        ("redis", "dogpile.cache"),
        False,
    ),
    ("cashews redis `@cache(lock=True)` (tasks)", "cashews", ("redis", "cashews"), True),
    ("aiocache redis `cached_stampede` (tasks)", "aiocache", ("redis", "aiocache"), True),
]


# -- the variants, built inside each worker process ---------------------------------------


def _stampede(url: str, load: Callable[[str], Any], distributed: bool) -> Callable[..., Any]:
    import redis

    import stampede

    client = redis.Redis.from_url(url)

    @stampede.cached(cache=client, ttl=TTL, distributed=distributed)
    def value(key: str) -> Any:
        return load(key)

    return value


def _dogpile(url: str, load: Callable[[str], Any]) -> Callable[..., Any]:
    from dogpile.cache import make_region

    region = make_region().configure(
        "dogpile.cache.redis",
        expiration_time=TTL,
        arguments={
            "url": url,
            "redis_expiration_time": TTL + 60,
            "distributed_lock": True,
            # dogpile warns unless the lock's token is shared by the process's threads
            "thread_local_lock": False,
        },
    )

    @region.cache_on_arguments()
    def value(key: str) -> Any:
        return load(key)

    return value


def _cashews(url: str, load: Callable[[str], Any]) -> Callable[..., Any]:
    import cashews

    cache = cashews.Cache()
    cache.setup(url)

    @cache(ttl=TTL, lock=True)
    async def value(key: str) -> Any:
        return await load(key)

    return value


def _aiocache(url: str, load: Callable[[str], Any]) -> Callable[..., Any]:
    from urllib.parse import urlsplit

    import aiocache
    from aiocache.serializers import PickleSerializer

    where = urlsplit(url)

    @aiocache.cached_stampede(
        ttl=TTL,
        lease=2,
        cache=aiocache.RedisCache,
        endpoint=where.hostname,
        port=where.port,
        serializer=PickleSerializer(),
        namespace="bench-fleet",
    )
    async def value(key: str) -> Any:
        return await load(key)

    return value


def _build(name: str, url: str, loads: Any) -> Callable[..., Any]:
    def count() -> None:
        with loads.get_lock():
            loads.value += 1

    def load(key: str) -> str:
        count()
        time.sleep(LOADER_S)
        return f"value of {key}"

    async def aload(key: str) -> str:
        count()
        await asyncio.sleep(LOADER_S)
        return f"value of {key}"

    if name == "stampede_distributed":
        return _stampede(url, load, True)
    if name == "stampede_local":
        return _stampede(url, load, False)
    if name == "dogpile":
        return _dogpile(url, load)
    if name == "cashews":
        return _cashews(url, aload)
    if name == "aiocache":
        return _aiocache(url, aload)
    raise ValueError(name)


# -- the worker process -------------------------------------------------------------------


def _threads_trial(fn: Callable[..., Any], key: str, barrier: Any) -> tuple[list[float], int]:
    go = threading.Event()
    latencies: list[float] = []
    errors = [0]

    def caller() -> None:
        go.wait()
        start = time.perf_counter()
        try:
            fn(key)
        except Exception:
            errors[0] += 1
            return
        latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=caller, daemon=True) for _ in range(CALLERS)]
    for t in threads:
        t.start()
    barrier.wait(BARRIER_S)
    go.set()
    for t in threads:
        t.join(BARRIER_S)
    return latencies, errors[0]


async def _tasks_trial(fn: Callable[..., Any], key: str, barrier: Any) -> tuple[list[float], int]:
    go = asyncio.Event()
    latencies: list[float] = []
    errors = [0]

    async def caller() -> None:
        await go.wait()
        start = time.perf_counter()
        try:
            await fn(key)
        except Exception:
            errors[0] += 1
            return
        latencies.append(time.perf_counter() - start)

    tasks = [asyncio.ensure_future(caller()) for _ in range(CALLERS)]
    await asyncio.sleep(0)  # every task is waiting on `go`
    barrier.wait(BARRIER_S)  # blocks the loop on purpose: nothing else is due
    go.set()
    await asyncio.wait_for(asyncio.gather(*tasks), BARRIER_S)
    return latencies, errors[0]


def _worker(
    name: str, is_async: bool, url: str, keys: list[str], barrier: Any, loads: Any, conn: Any
) -> None:
    try:
        fn = _build(name, url, loads)
    except Exception as exc:
        conn.send(("error", reason(exc)))
        return
    conn.send(("ready", None))
    try:
        if is_async:

            async def run() -> None:
                for key in keys:
                    conn.send(("trial", await _tasks_trial(fn, key, barrier)))

            asyncio.run(run())
        else:
            for key in keys:
                conn.send(("trial", _threads_trial(fn, key, barrier)))
    except Exception as exc:
        conn.send(("error", reason(exc)))


# -- counting commands --------------------------------------------------------------------


class Observer:
    """INFO commandstats deltas and the slow log of the private server, around a trial."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.own = client.client_info()["addr"]
        self.before: Counter[str] = Counter()
        self.baseline: Counter[str] = Counter()
        self._saved = client.config_get("slowlog-*")
        client.config_set("slowlog-max-len", 100_000)
        client.config_set("slowlog-log-slower-than", 0)

    def _stats(self) -> Counter[str]:
        info = self.client.info("commandstats")
        return Counter({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()})

    def start(self) -> None:
        self.client.slowlog_reset()
        self.before = self._stats()

    def stop(self) -> tuple[Counter[str], Counter[str]]:
        """(all commands the server ran, commands clients sent) since ``start``."""
        delta = self._stats() - self.before - self.baseline
        sent: Counter[str] = Counter()
        for entry in self.client.slowlog_get(100_000):
            address = _text(entry.get("client_address", b""))
            if address == self.own or address.startswith("?") or address.endswith(":0"):
                continue  # the observer itself, or a command run inside a Lua script
            if address:
                sent[_text(entry["command"]).split(" ", 1)[0].lower()] += 1
        return delta, sent

    def calibrate(self) -> None:
        self.start()
        self.baseline = self._stats() - self.before

    def close(self) -> None:
        for name, value in self._saved.items():
            self.client.config_set(name, value)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


# -- results ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Trial:
    loads: int
    p50: float  # caller latency beyond the loader, seconds
    p99: float
    max: float
    errors: int
    commands: int  # all commands the server ran (INFO commandstats)
    sent: int  # of which clients sent (round trips); the rest ran inside scripts
    names: Counter[str]


@dataclasses.dataclass
class FleetResult:
    label: str
    trials: list[Trial] = dataclasses.field(default_factory=list)
    note: str = ""

    @property
    def typical(self) -> Trial | None:
        """The median trial by p99."""
        ordered = sorted(self.trials, key=lambda t: t.p99)
        return ordered[(len(ordered) - 1) // 2] if ordered else None

    def loads(self) -> str:
        return " / ".join(str(t.loads) for t in self.trials) if self.trials else "n/a"


@dataclasses.dataclass
class FleetResults:
    rows: list[FleetResult]
    server: str
    trials: int


# -- running one variant ------------------------------------------------------------------


def _run_variant(
    label: str, name: str, is_async: bool, url: str, observer: Observer, trials: int
) -> FleetResult:
    result = FleetResult(label)
    ctx = multiprocessing.get_context("spawn")
    run = uuid.uuid4().hex[:8]
    keys = [f"fleet:{run}:{name}:{i}" for i in range(trials + 1)]  # [0]: warm-up
    barrier = ctx.Barrier(PROCESSES + 1)
    loads = ctx.Value("i", 0)
    pipes = [ctx.Pipe(duplex=False) for _ in range(PROCESSES)]
    procs = [
        ctx.Process(
            target=_worker,
            args=(name, is_async, url, keys, barrier, loads, send),
            daemon=True,
        )
        for _, send in pipes
    ]
    deadline = time.monotonic() + VARIANT_S

    def receive(kind: str) -> list[Any]:
        out = []
        for recv, _ in pipes:
            if not recv.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"no answer from a process within {VARIANT_S:g} s")
            got, payload = recv.recv()
            if got == "error":
                raise Unavailable(f"n/a: {payload}")
            if got != kind:
                raise RuntimeError(f"unexpected message {got!r}")
            out.append(payload)
        return out

    try:
        for proc in procs:
            proc.start()
        receive("ready")
        for i in range(len(keys)):
            with loads.get_lock():
                loads.value = 0
            observer.start()
            barrier.wait(max(0.1, min(BARRIER_S, deadline - time.monotonic())))
            answers = receive("trial")
            delta, sent = observer.stop()
            if i == 0:
                continue  # warm-up: connections, scripts
            latencies = sorted(x - LOADER_S for lat, _ in answers for x in lat)
            errors = sum(err for _, err in answers)
            if not latencies:
                raise RuntimeError(f"every call failed ({errors} errors)")
            result.trials.append(
                Trial(
                    loads.value,
                    percentile(latencies, 0.5),
                    percentile(latencies, 0.99),
                    latencies[-1],
                    errors,
                    sum(delta.values()),
                    sum(sent.values()),
                    sent,
                )
            )
    except Exception as exc:
        text = reason(exc)
        if isinstance(exc, threading.BrokenBarrierError):
            text = "BrokenBarrierError (a process did not reach the start in time)"
        result.note = text if text.startswith("n/a") else f"n/a: {text}"
    finally:
        barrier.abort()
        for proc in procs:
            proc.join(max(0.5, min(5.0, deadline - time.monotonic())))
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    return result


def _missing(modules: tuple[str, ...]) -> str | None:
    for module in modules:
        try:
            if importlib.util.find_spec(module) is None:
                return module
        except ModuleNotFoundError:
            return module
    return None


def bench_fleet(cfg: Config) -> FleetResults:
    trials = 1 if cfg.quick else 3
    try:
        import redis

        from tests.support.redis_server import RedisServer

        server = RedisServer()
        server.start()
    except Exception as exc:
        text = reason(exc)
        note = text if text.startswith("n/a") else f"n/a: {text}"
        progress(f"fleet: no private Redis server ({note})")
        return FleetResults([FleetResult(v[0], note=note) for v in VARIANTS], note, trials)
    rows = []
    try:
        client = redis.Redis.from_url(server.url)
        version = f"redis-server {client.info('server')['redis_version']}"
        observer = Observer(client)
        try:
            observer.calibrate()
            for label, name, modules, is_async in VARIANTS:
                missing = _missing(modules)
                if missing:
                    rows.append(FleetResult(label, note=f"n/a (not installed: {missing})"))
                    continue
                progress(f"fleet: {label}")
                rows.append(_run_variant(label, name, is_async, server.url, observer, trials))
        finally:
            observer.close()
            client.close()
    finally:
        server.stop()
    return FleetResults(rows, version, trials)


# -- report -------------------------------------------------------------------------------


def _top(names: Counter[str]) -> str:
    return ", ".join(f"{n:,} {name.upper()}" for name, n in names.most_common(4))


def _read_commands(label: str) -> int:
    """The commands of one read of the key: stampede's hit is GETRANGE + PTTL sent
    together (one round trip), the peers' a GET."""
    return 2 if label.startswith("stampede") else 1


def _beyond(t: Trial, label: str) -> int:
    """Commands sent beyond one read per process (the DESIGN's measure: concurrent
    first reads in a process are coalesced into one)."""
    return t.sent - PROCESSES * _read_commands(label)


def report_fleet(results: FleetResults) -> str:
    rows = []
    for r in results.rows:
        t = r.typical
        if t is None:
            rows.append([r.label, *["n/a"] * 8, "", r.note])
            continue
        flights = 1  # one cold key per trial: one flight
        rows.append(
            [
                r.label,
                r.loads(),
                ms(t.p50),
                ms(t.p99),
                ms(t.max),
                str(sum(x.errors for x in r.trials)),
                f"{t.commands:,}",
                f"{t.sent:,}",
                f"{t.commands / PROCESSES / flights:,.1f} / {t.sent / PROCESSES / flights:,.1f}",
                f"{_beyond(t, r.label) / PROCESSES / flights:,.2f}",
                _top(t.names) + (f"; {r.note}" if r.note else ""),
            ]
        )
    return table(
        [
            "variant",
            "loader calls (per trial)",
            "p50 (ms)",
            "p99 (ms)",
            "max (ms)",
            "errors",
            "Redis commands per trial (all)",
            "of which sent by clients",
            "per process per flight (all / sent)",
            "sent beyond one read per process, per process",
            "most sent (median trial)",
        ],
        rows,
    )


def fleet_note(results: FleetResults) -> str:
    return (
        f"{PROCESSES} processes (multiprocessing, spawn) x {CALLERS} callers (threads; the "
        f"cashews and aiocache rows: {CALLERS} asyncio tasks per process) ask for one missing "
        f"key at once, released together by a `multiprocessing.Barrier`; a fresh key per "
        f"trial, {results.trials} trial(s) per variant after one unreported warm-up trial; "
        f"{LOADER_S * 1e3:g} ms loader (`time.sleep`; the task rows `asyncio.sleep`), its "
        f"calls counted in a `multiprocessing.Value`. Latency: each caller's own call, minus "
        f"the loader's {LOADER_S * 1e3:g} ms, over all {PROCESSES * CALLERS} callers; p50/p99/max "
        f"and commands come from the median trial by p99. Commands: `INFO commandstats` delta "
        f"of the private server ({results.server}) around the trial, minus the observer's own "
        f'("all": includes the commands Lua scripts run inside Redis); "sent by clients": '
        f"from the server's slow log (every command logged); \"beyond one read per process\": "
        f"sent minus one read of the key per process (stampede's GETRANGE + PTTL, a peer's "
        f"GET; concurrent first reads in a process should be one), i.e. what coordinating the "
        f"flight cost. Each variant is "
        f"bounded to {VARIANT_S:g} s."
    )


def fleet_targets(results: FleetResults) -> list[Target]:
    what = f"{PROCESSES} processes x {CALLERS} callers, Redis, cold key"
    row = next((r for r in results.rows if r.label == STAMPEDE_DISTRIBUTED), None)
    t = row.typical if row else None
    if row is None or t is None:
        why = row.note if row else "n/a"
        return [
            Target(f"{what}: loader calls", "1", why, None),
            Target(f"{what}: p99 caller latency", "<= loader + 15 ms", why, None),
            Target(f"{what}: Redis commands per process per flight", "<= 5", why, None),
        ]
    worst = max(x.loads for x in row.trials)
    all_pp, sent_pp = t.commands / PROCESSES, t.sent / PROCESSES
    return [
        Target(
            f"{what}: loader calls",
            "1",
            f"{worst} (worst of {len(row.trials)})",
            worst == 1,
        ),
        Target(
            f"{what}: p99 caller latency (median trial)",
            "<= loader + 15 ms",
            f"loader {ms(t.p99)} ms",
            t.p99 <= P99_SLACK_S,
        ),
        Target(
            f"{what}: Redis commands per process per flight",
            f"<= {MAX_COMMANDS}",
            f"{_beyond(t, row.label) / PROCESSES:.2f} sent beyond one read per process "
            f"({sent_pp:.1f} sent by clients; {all_pp:.1f} all, Lua-internal included)",
            _beyond(t, row.label) / PROCESSES <= MAX_COMMANDS,
        ),
    ]
