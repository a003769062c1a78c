#!/usr/bin/env python
"""Idempotency keys: stampede beside idemkit, AWS Lambda Powertools and fastapi-idempotency.

    python benchmarks/bench_idempotency.py [--quick] [--only stampede,idemkit,...]

Every library runs the same FastAPI app (``benchmarks/idem_apps/app.py``: one
``POST /orders`` route whose handler counts its runs with ``INCR`` on a second
Redis and takes 50 ms), on one private ``redis-server`` for the records (a free
loopback port, no persistence; a Redis already running on the machine is never
touched). Three measures (issue 15):

1. **Runs per burst.** ``--burst`` (200) concurrent requests with one
   ``Idempotency-Key`` and one body, each on a new connection (``httpx``), to
   ``uvicorn --workers 4``, ``--bursts`` (3) times with a new key: handler runs per
   burst (ideal 1), answers that carry the first run's body (the replays, and the
   first run's own answer), 2xx answers of another run, and errors by status. The
   same at the function level: 200 threads released together in one process,
   then 4 processes x 50 threads, calling the library's function API
   (``idem_apps/functions.py``).
2. **Store round trips** for a first request and its replays, one worker, on
   a keep-alive connection, nothing else talking to the records' Redis: read
   events (``total_reads_processed``: one per round trip), the commands the
   worker sent (the slow log, recording every command) and the commands Redis ran
   (``INFO commandstats``: a script's inner ones included), with the counting
   commands' own share measured and taken off.
3. **Replay latency vs a bare route.** One worker per app, all apps up together;
   ``--requests`` (500) sequential replays per app on one keep-alive connection
   (a small HTTP/1.1 client here: httpx would add a few hundred µs of its own per
   request), in interleaved rounds; p50 / p99 and their ratios to the same route
   with no idempotency and a handler that does nothing (no sleep, no ``INCR``).

Markdown on stdout, progress on stderr. Exit status 0 whatever the numbers and
whichever peer is missing (its rows show ``n/a`` and why); 1 when no Redis server
can be started, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import multiprocessing
import os
import platform
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's stampede, examples, tests.support, benchmarks
sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis  # noqa: E402
from _common import percentile, progress, reason, table  # noqa: E402

from benchmarks.idem_apps.functions import (  # noqa: E402
    FUNCTION_LIBRARIES,
    make_call,
    serve,
    thread_burst,
)
from examples.service.fleet import Service  # noqa: E402

APP = "benchmarks.idem_apps.app:app"
WORK_S = 0.05  # the handler's time (the issue's ~50 ms)
BODY = {"order": 7, "amount": 500}
BARE = "bare"
SETTLE_S = 0.02  # after an answer, before counting what the server ran for it
REQUEST_TIMEOUT = 30.0  # an HTTP request not answered by then counts as an error


@dataclasses.dataclass(frozen=True)
class App:
    key: str  # IDEM_LIBRARY, and --only's name (without "-local")
    label: str
    module: str | None  # the peer that must be installed
    burst: bool  # measure 1 runs it (the local-cache variants only change replays)


APPS = [
    App(BARE, "bare route (no idempotency)", None, True),
    App("stampede", "stampede `IdempotencyMiddleware` (Redis)", None, True),
    App("stampede-local", "stampede, `local_records=1000`", None, False),
    App("idemkit", "idemkit `IdempotencyMiddleware` (`RedisBackend`)", "idemkit", True),
    App("idemkit-local", "idemkit, `use_local_cache=True`", "idemkit", False),
    App(
        "powertools",
        "Powertools `@idempotent_function` in the route (Redis layer)",
        "aws_lambda_powertools",
        True,
    ),
    App("powertools-local", "Powertools, `use_local_cache=True`", "aws_lambda_powertools", False),
    App(
        "fastapi-idempotency",
        "fastapi-idempotency `IdempotencyMiddleware` (`MemoryStore`)",
        "fastapi_idempotency",
        True,
    ),
]
FUNCTION_LABELS = {
    "stampede": "stampede `Idempotency.do` (redis.Redis)",
    "idemkit": "idemkit `@idempotent_sync` (`RedisBackend`)",
    "powertools": "Powertools `@idempotent_function` (Redis layer)",
}
FUNCTION_MODULES = {"stampede": None, "idemkit": "idemkit", "powertools": "aws_lambda_powertools"}
NO_FUNCTION_API = (
    "fastapi-idempotency",
    "n/a (an HTTP middleware only: no function API)",
)
NO_REDIS_STORE = (
    "n/a: the records are in the worker's memory (`MemoryStore`); the package ships no "
    "Redis store (memory, Tortoise ORM)"
)
PEERS = ("stampede", "idemkit", "powertools", "fastapi-idempotency")


@dataclasses.dataclass(frozen=True)
class Config:
    quick: bool
    only: frozenset[str]
    workers: int
    bursts: int
    burst: int
    processes: int
    requests: int  # timed replays per app (measure 3)
    rounds: int  # ... in this many interleaved rounds
    keys: int  # first requests counted per app (measure 2)

    def wants(self, key: str) -> bool:
        return key == BARE or key.removesuffix("-local") in self.only


def _missing(module: str | None) -> str | None:
    if module is not None and importlib.util.find_spec(module) is None:
        return f"n/a (not installed: {module})"
    return None


# -- a keep-alive HTTP/1.1 client (measures 2 and 3) ------------------------------------------


class Connection:
    """One keep-alive connection sending ``POST`` requests one after another."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def __aenter__(self) -> Connection:
        self._streams = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), REQUEST_TIMEOUT
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._streams is not None:
            self._streams[1].close()
            with contextlib.suppress(OSError):
                await self._streams[1].wait_closed()

    async def post(self, path: str, key: str, body: bytes) -> tuple[int, bytes]:
        """(status, body) of ``POST path`` with ``Idempotency-Key: key``."""
        assert self._streams is not None
        reader, writer = self._streams
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Idempotency-Key: {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode("latin-1") + body)
        return await asyncio.wait_for(self._response(reader), REQUEST_TIMEOUT)

    @staticmethod
    async def _response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        fields = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if "content-length" in fields:
            return status, await reader.readexactly(int(fields["content-length"]))
        if fields.get("transfer-encoding", "").lower() != "chunked":
            raise ValueError("neither Content-Length nor chunked")
        chunks: list[bytes] = []
        while True:  # the replays of stampede and idemkit come chunked (no Content-Length)
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return status, b"".join(chunks)
            chunks.append(chunk[:-2])


def _same(a: bytes, b: bytes) -> bool:
    """The same JSON document (a replay of that answer)."""
    with contextlib.suppress(ValueError):
        return bool(json.loads(a) == json.loads(b))
    return a == b


# -- what the records' Redis saw --------------------------------------------------------------

OWN = {"INFO", "SLOWLOG", "CONFIG"}  # the counting's own commands


@dataclasses.dataclass
class Seen:
    reads: float = 0.0  # read events: round trips
    sent: Counter[str] = dataclasses.field(default_factory=Counter)  # by the client
    scripted: Counter[str] = dataclasses.field(default_factory=Counter)  # run by a script

    def __add__(self, other: Seen) -> Seen:
        return Seen(
            self.reads + other.reads, self.sent + other.sent, self.scripted + other.scripted
        )

    def per(self, n: int) -> Seen:
        return Seen(
            self.reads / n,
            Counter({k: v / n for k, v in self.sent.items()}),
            Counter({k: v / n for k, v in self.scripted.items()}),
        )


class Probe:
    """What a Redis server ran between ``start()`` and ``stop()``.

    The slow log records every command (``slowlog-log-slower-than 0``), those a
    script runs with the address ``?:0`` (the script's own client, no round trip).
    ``total_reads_processed`` counts reads of client requests: round trips. The
    probe's own share (an ``INFO``, the slow log's ``RESET`` and ``GET``) is measured
    once with nothing in between and taken off."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        client.config_set("slowlog-log-slower-than", 0)
        client.config_set("slowlog-max-len", 10_000)
        self._own_reads = 0
        self._own_reads = int(self.stop(self.start()).reads)

    def _reads(self) -> int:
        return int(self.client.info("stats")["total_reads_processed"])

    def start(self) -> int:
        before = self._reads()
        self.client.slowlog_reset()
        return before

    def stop(self, before: int) -> Seen:
        log = self.client.slowlog_get(10_000)
        seen = Seen(float(self._reads() - before - self._own_reads))
        for entry in log:
            command = entry["command"]  # the arguments, joined by spaces (binary ones too)
            if isinstance(command, bytes):
                command = command.decode("latin-1")
            name = str(command).split(" ", 1)[0].upper()
            address = entry.get("client_address") or b""
            if isinstance(address, bytes):
                address = address.decode("latin-1")
            if name in OWN:
                continue
            (seen.scripted if str(address).startswith("?") else seen.sent)[name] += 1
        return seen


def _names(counts: Counter[str]) -> str:
    if not counts:
        return "none"
    return ", ".join(
        f"{name.upper()}" + (f" x{n:g}" if abs(n - 1) > 1e-9 else "")
        for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    )


# -- measure 1: bursts ----------------------------------------------------------------------


@dataclasses.dataclass
class Burst:
    runs: int
    first: int  # answers with the first run's value (body)
    other: int  # 2xx (values) of another run
    errors: Counter[str]
    latencies: list[float] = dataclasses.field(default_factory=list)  # the client's


def _tally(runs: int, outcomes: Sequence[tuple[str, Any]]) -> Burst:
    """``outcomes``: ("value", run number) or ("error", what)."""
    first = sum(1 for kind, what in outcomes if kind == "value" and what == 1)
    other = sum(1 for kind, what in outcomes if kind == "value" and what != 1)
    errors = Counter(str(what) for kind, what in outcomes if kind == "error")
    return Burst(runs, first, other, errors)


async def _http_burst(url: str, key: str, n: int) -> tuple[list[tuple[str, Any]], list[float]]:
    """``n`` concurrent ``POST /orders`` with ``key``, each on a new connection: the
    outcomes (as ``_tally`` takes them) and the latencies."""
    import httpx

    body = json.dumps(BODY).encode()
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    latencies: list[float] = []

    async def one(client: httpx.AsyncClient) -> tuple[str, Any]:
        t0 = time.perf_counter()
        try:
            r = await client.post(
                url + "/orders",
                content=body,
                headers={"Idempotency-Key": key, "Content-Type": "application/json"},
            )
        except httpx.HTTPError as exc:
            return "error", type(exc).__name__
        latencies.append(time.perf_counter() - t0)
        if 200 <= r.status_code < 300:
            try:
                return "value", r.json()["run"]
            except (ValueError, KeyError):
                return "error", f"{r.status_code} (not an order)"
        return "error", str(r.status_code)

    async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT) as client:
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(one(client) for _ in range(n))), REQUEST_TIMEOUT + 10
        )
    return list(outcomes), latencies


async def _http_bursts(
    cfg: Config, app: App, workers: int, store_url: str, counter: redis.Redis
) -> list[Burst]:
    ns = f"b-{app.key}-{uuid.uuid4().hex[:6]}"
    service = Service(
        store_url,
        "http://127.0.0.1:9",  # no origin: Service's setting, unused by these apps
        workers=workers,
        app=APP,
        namespace=ns,
        env={
            "IDEM_LIBRARY": app.key,
            "IDEM_NAMESPACE": ns,
            "COUNTER_URL": _url(counter),
            "IDEM_WORK_MS": str(WORK_S * 1000),
        },
    )
    with service:
        await service.wait_ready(60)
        # Unmeasured: each worker opens its Redis connections (and loads its scripts).
        await _http_burst(service.url, f"warm-{uuid.uuid4().hex[:8]}", 4 * workers)
        out = []
        for _ in range(cfg.bursts):
            key = f"burst-{uuid.uuid4().hex[:12]}"
            outcomes, latencies = await _http_burst(service.url, key, cfg.burst)
            burst = _tally(int(counter.get(f"runs:{ns}:{key}") or 0), outcomes)
            burst.latencies = latencies
            out.append(burst)
        return out


def _url(client: redis.Redis) -> str:
    kw = client.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/0"


def _num(x: float) -> str:
    return f"{x:.0f}" if abs(x - round(x)) < 1e-9 else f"{x:.1f}"


def _burst_row(label: str, surface: str, bursts: list[Burst] | str) -> list[str]:
    if isinstance(bursts, str):
        return [label, surface, bursts, "", "", "", ""]
    n = len(bursts)
    errors = sum((b.errors for b in bursts), Counter())
    lat = sorted(t for b in bursts for t in b.latencies)
    return [
        label,
        surface,
        " / ".join(str(b.runs) for b in bursts),
        _num(sum(b.first for b in bursts) / n),
        _num(sum(b.other for b in bursts) / n),
        ", ".join(f"{what} x{_num(count / n)}" for what, count in errors.most_common()) or "0",
        f"{percentile(lat, 0.5) * 1e3:.0f} / {lat[-1] * 1e3:.0f}" if lat else "",
    ]


async def measure_bursts(cfg: Config, store_url: str, counter: redis.Redis) -> list[list[str]]:
    rows = []
    plan = [(a, cfg.workers) for a in APPS if a.burst and cfg.wants(a.key)]
    if cfg.wants("fastapi-idempotency") and not cfg.quick:
        # Its store is per process: one worker shows what it does where it can work.
        plan.append((next(a for a in APPS if a.key == "fastapi-idempotency"), 1))
    for app, workers in plan:
        surface = f"HTTP, {workers} worker{'s' if workers > 1 else ''}"
        missing = _missing(app.module)
        if missing:
            rows.append(_burst_row(app.label, surface, missing))
            continue
        progress(f"bursts: {app.key}, {workers} worker(s)")
        try:
            bursts = await _http_bursts(cfg, app, workers, store_url, counter)
            rows.append(_burst_row(app.label, surface, bursts))
        except Exception as exc:
            rows.append(_burst_row(app.label, surface, f"n/a ({reason(exc)})"))
    return rows


def function_bursts(cfg: Config, store_url: str, counter: redis.Redis) -> list[list[str]]:
    rows = []
    libraries = [lib for lib in FUNCTION_LIBRARIES if cfg.wants(lib)]
    for lib in libraries:
        label = FUNCTION_LABELS[lib]
        surface = f"function, {cfg.burst} threads"
        missing = _missing(FUNCTION_MODULES[lib])
        if missing:
            rows.append(_burst_row(label, surface, missing))
            continue
        progress(f"bursts: {lib}, threads")
        ns = f"t-{lib}-{uuid.uuid4().hex[:6]}"
        try:
            call = make_call(lib, store_url, _url(counter), ns, WORK_S)
            thread_burst(call, f"warm-{uuid.uuid4().hex[:8]}", dict(BODY), 4, 30)
            bursts = []
            for _ in range(cfg.bursts):
                key = f"burst-{uuid.uuid4().hex[:12]}"
                outcomes = thread_burst(call, key, dict(BODY), cfg.burst, REQUEST_TIMEOUT)
                bursts.append(_tally(int(counter.get(f"runs:{ns}:{key}") or 0), outcomes))
            rows.append(_burst_row(label, surface, bursts))
        except Exception as exc:
            rows.append(_burst_row(label, surface, f"n/a ({reason(exc)})"))
    if cfg.processes > 1 and libraries:
        rows += _process_bursts(cfg, libraries, store_url, counter)
    if cfg.wants(NO_FUNCTION_API[0]):
        rows.append(_burst_row(NO_FUNCTION_API[0], "function", NO_FUNCTION_API[1]))
    return rows


def _process_bursts(
    cfg: Config, libraries: list[str], store_url: str, counter: redis.Redis
) -> list[list[str]]:
    """The thread burst split over ``cfg.processes`` processes (spawned, each its own
    clients), all released together at a barrier."""
    threads = cfg.burst // cfg.processes
    surface = f"function, {cfg.processes} processes x {threads} threads"
    ns = f"p-{uuid.uuid4().hex[:6]}"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(cfg.processes)
    results = ctx.Queue()
    queues = [ctx.Queue() for _ in range(cfg.processes)]
    procs = [
        ctx.Process(
            target=serve,
            args=(store_url, _url(counter), ns, WORK_S, threads, q, results, barrier),
            daemon=True,
        )
        for q in queues
    ]
    rows = []
    progress(f"bursts: {cfg.processes} processes starting")
    for p in procs:
        p.start()
    try:
        for lib in libraries:
            label = FUNCTION_LABELS[lib]
            missing = _missing(FUNCTION_MODULES[lib])
            if missing:
                rows.append(_burst_row(label, surface, missing))
                continue
            progress(f"bursts: {lib}, processes")
            bursts: list[Burst] = []
            failed = None
            for i in range(cfg.bursts + 1):  # the first one warms up, unmeasured
                key = f"burst-{lib}-{uuid.uuid4().hex[:12]}"
                for q in queues:
                    q.put((lib, key, dict(BODY), REQUEST_TIMEOUT))
                outcomes: list[tuple[str, Any]] = []
                for _ in procs:
                    kind, what = results.get(timeout=120)
                    if kind == "done":
                        outcomes += what
                    else:
                        failed = failed or what
                if failed:
                    barrier.reset()
                    break
                if i:
                    bursts.append(_tally(int(counter.get(f"runs:{ns}:{key}") or 0), outcomes))
            rows.append(_burst_row(label, surface, f"n/a ({failed})" if failed else bursts))
    except Exception as exc:
        rows.append(_burst_row("(the process bursts)", surface, f"n/a ({reason(exc)})"))
    finally:
        for q in queues:
            q.put(None)
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)
    return rows


# -- measures 2 and 3: one worker per app, all up together ----------------------------------


@dataclasses.dataclass
class Single:
    app: App
    service: Service
    first: Seen = dataclasses.field(default_factory=Seen)
    replay1: Seen = dataclasses.field(default_factory=Seen)
    replays: Seen = dataclasses.field(default_factory=Seen)
    latencies: list[float] = dataclasses.field(default_factory=list)
    mismatches: int = 0
    error: str | None = None


@contextlib.contextmanager
def _services(apps: list[App], store_url: str) -> Iterator[list[Single]]:
    singles = []
    try:
        for app in apps:
            ns = f"s-{app.key}-{uuid.uuid4().hex[:6]}"
            service = Service(
                store_url,
                "http://127.0.0.1:9",
                workers=1,
                app=APP,
                namespace=ns,
                # The records' Redis only: no counting, no work (replays never run it,
                # and the bare route is then the least any answer here costs).
                env={"IDEM_LIBRARY": app.key, "IDEM_NAMESPACE": ns, "IDEM_WORK_MS": "0",
                     "IDEM_COUNT": "0"},
            )  # fmt: skip
            singles.append(Single(app, service.start()))
        yield singles
    finally:
        for single in singles:
            single.service.stop()
            single.service.remove_log()


async def _round_trips(single: Single, probe: Probe, keys: int) -> None:
    body = json.dumps(BODY).encode()
    service = single.service
    async with Connection(service.host, service.port) as conn:
        warm = f"warm-{uuid.uuid4().hex[:8]}"
        for _ in range(3):  # unmeasured: connections opened, scripts loaded
            await conn.post("/orders", warm, body)
        for i in range(keys):
            key = f"rt-{i}-{uuid.uuid4().hex[:8]}"
            seen = []
            for _ in range(3):  # the first request, the first replay, a later replay
                before = probe.start()
                status, _ = await conn.post("/orders", key, body)
                if not 200 <= status < 300:
                    raise RuntimeError(f"HTTP {status}")
                # idemkit records the outcome after the answer is sent: let it land here.
                await asyncio.sleep(SETTLE_S)
                seen.append(probe.stop(before))
            single.first += seen[0]
            single.replay1 += seen[1]
            single.replays += seen[2]
    single.first, single.replay1, single.replays = (
        single.first.per(keys),
        single.replay1.per(keys),
        single.replays.per(keys),
    )


async def _latency_round(single: Single, key: str, expected: bytes, n: int) -> None:
    body = json.dumps(BODY).encode()
    service = single.service
    async with Connection(service.host, service.port) as conn:
        for _ in range(max(5, n // 10)):  # unmeasured warm-up on this connection
            await conn.post("/orders", key, body)
        for _ in range(n):
            t0 = time.perf_counter()
            status, answer = await conn.post("/orders", key, body)
            single.latencies.append(time.perf_counter() - t0)
            if single.app.key != BARE and not (200 <= status < 300 and _same(answer, expected)):
                single.mismatches += 1


async def measure_single(cfg: Config, store: redis.Redis, store_url: str) -> list[Single]:
    apps = [a for a in APPS if cfg.wants(a.key)]
    runnable = [a for a in apps if _missing(a.module) is None]
    progress(f"one worker each: {', '.join(a.key for a in runnable)}")
    with _services(runnable, store_url) as singles:
        for single in singles:
            try:
                await single.service.wait_ready(60)
            except Exception as exc:
                single.error = f"n/a ({reason(exc)})"
        probe = Probe(store)
        live = [s for s in singles if s.error is None]
        progress("store round trips")
        for single in live:
            try:
                await _round_trips(single, probe, cfg.keys)
            except Exception as exc:
                single.error = f"n/a ({reason(exc)})"
        live = [s for s in live if s.error is None]
        body = json.dumps(BODY).encode()
        firsts: dict[str, tuple[str, bytes]] = {}
        for single in live:
            key = f"lat-{uuid.uuid4().hex[:12]}"
            async with Connection(single.service.host, single.service.port) as conn:
                status, first = await conn.post("/orders", key, body)
            if not 200 <= status < 300:
                single.error = f"n/a (first request: HTTP {status})"
            firsts[single.app.key] = key, first
        live = [s for s in live if s.error is None]
        per_round = cfg.requests // cfg.rounds
        for r in range(cfg.rounds):
            progress(f"replay latency, round {r + 1} of {cfg.rounds}")
            order = live if r % 2 == 0 else live[::-1]  # drift touches every app alike
            for single in order:
                key, first = firsts[single.app.key]
                try:
                    await _latency_round(single, key, first, per_round)
                except Exception as exc:
                    single.error = f"n/a ({reason(exc)})"
    missing = [
        Single(a, Service("", ""), error=_missing(a.module)) for a in apps if a not in runnable
    ]
    return sorted(singles + missing, key=lambda s: APPS.index(s.app))


def _rt_cell(seen: Seen) -> str:
    return f"{seen.reads:.1f}: {_names(seen.sent)}"


def round_trip_rows(singles: list[Single]) -> list[list[str]]:
    rows = []
    for s in singles:
        if s.error:
            rows.append([s.app.label, s.error, "", "", ""])
            continue
        if s.app.key == "fastapi-idempotency":
            rows.append([s.app.label, NO_REDIS_STORE, "", "", ""])
            continue
        rows.append(
            [
                s.app.label,
                _rt_cell(s.first),
                _rt_cell(s.replay1),
                _rt_cell(s.replays),
                f"{_names(s.first.scripted)} / {_names(s.replays.scripted)}",
            ]
        )
    return rows


def function_round_trips(
    cfg: Config, store: redis.Redis, store_url: str, counter_url: str
) -> list[list[str]]:
    """The same counts for the function APIs, in this process."""
    rows = []
    probe = Probe(store)
    for lib in FUNCTION_LIBRARIES:
        if not cfg.wants(lib):
            continue
        label = FUNCTION_LABELS[lib]
        missing = _missing(FUNCTION_MODULES[lib])
        if missing:
            rows.append([label, missing, "", "", ""])
            continue
        try:
            call = make_call(lib, store_url, counter_url, f"f-{lib}-{uuid.uuid4().hex[:6]}", 0.0)
            warm = f"warm-{uuid.uuid4().hex[:8]}"
            for _ in range(3):
                call(warm, dict(BODY))
            phases = [Seen(), Seen(), Seen()]
            for i in range(cfg.keys):
                key = f"rt-{i}-{uuid.uuid4().hex[:8]}"
                for p in range(3):
                    before = probe.start()
                    call(key, dict(BODY))
                    phases[p] += probe.stop(before)
            first, replay1, replays = (p.per(cfg.keys) for p in phases)
            rows.append(
                [
                    label,
                    _rt_cell(first),
                    _rt_cell(replay1),
                    _rt_cell(replays),
                    f"{_names(first.scripted)} / {_names(replays.scripted)}",
                ]
            )
        except Exception as exc:
            rows.append([label, f"n/a ({reason(exc)})", "", "", ""])
    if cfg.wants(NO_FUNCTION_API[0]):
        rows.append([NO_FUNCTION_API[0], NO_FUNCTION_API[1], "", "", ""])
    return rows


def latency_rows(singles: list[Single]) -> list[list[str]]:
    bare = next((s for s in singles if s.app.key == BARE and not s.error), None)

    def stats(s: Single) -> tuple[float, float] | None:
        if s.error or not s.latencies:
            return None
        ordered = sorted(s.latencies)
        return percentile(ordered, 0.5), percentile(ordered, 0.99)

    ref = stats(bare) if bare else None
    rows = []
    for s in singles:
        got = stats(s)
        if got is None:
            rows.append([s.app.label, s.error or "n/a", "", "", "", "", ""])
            continue
        p50, p99 = got
        rows.append(
            [
                s.app.label,
                f"{p50 * 1e6:,.0f}",
                f"{p99 * 1e6:,.0f}",
                f"{p50 / ref[0]:.2f}x" if ref else "n/a",
                f"{p99 / ref[1]:.2f}x" if ref else "n/a",
                f"{(p50 - ref[0]) * 1e6:+,.0f}" if ref else "n/a",
                str(s.mismatches) if s.app.key != BARE else "",
            ]
        )
    return rows


# -- the report -------------------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_line(redis_version: str) -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    dists = (
        "stampede", "idemkit", "aws-lambda-powertools", "fastapi-idempotency", "fastapi",
        "starlette", "uvicorn", "httpx", "redis",
    )  # fmt: skip
    versions = ", ".join(f"{d} {_version(d)}" for d in dists)
    return (
        f"{datetime.date.today().isoformat()}; {os.cpu_count()} cores ({cpu}); "
        f"CPython {platform.python_version()}; redis-server {redis_version}; "
        f"uvicorn loop {loop}, HTTP {http}; {versions}"
    )


WIRING = (
    "Wiring (`benchmarks/idem_apps/`), every library with its defaults unless said: "
    "stampede: `stampede.asgi.IdempotencyMiddleware` over `AsyncIdempotency(redis.asyncio."
    "Redis)` (wait and replay, 10 s lease renewed); idemkit: its ASGI "
    '`IdempotencyMiddleware` over `RedisBackend.from_url` (`scope_mode="single_tenant"`; '
    "wait and replay via pub/sub); Powertools: no HTTP middleware exists, so the (sync) "
    "route calls an `@idempotent_function` on `RedisCachePersistenceLayer`, keyed on the "
    '`Idempotency-Key` header (`event_key_jmespath="key"`), its '
    "`IdempotencyAlreadyInProgressError` answered 409; the body is not validated "
    "(`payload_validation_jmespath` makes identical retries fail on this layer); "
    "fastapi-idempotency: its `IdempotencyMiddleware` with `MemoryStore`, the only store it "
    "ships besides Tortoise ORM (SQL), so each worker has its own records. `-local` rows: "
    "stampede `local_records=1000`, idemkit and Powertools `use_local_cache=True`."
)
BURST_HEADER = [
    "library",
    "surface",
    "handler runs per burst (ideal 1)",
    "got the first run's answer (mean per burst)",
    "2xx of another run",
    "errors (mean per burst)",
    "latency p50 / max (ms)",
]
RT_HEADER = [
    "library",
    "first request: round trips: commands sent",
    "first replay",
    "later replays",
    "commands run inside scripts: first request / later replay",
]
LATENCY_HEADER = [
    "app",
    "p50 µs",
    "p99 µs",
    "p50 vs bare",
    "p99 vs bare",
    "p50 minus bare (µs)",
    "answers not the first run's",
]


def report(
    cfg: Config,
    version: str,
    bursts: list[list[str]],
    singles: list[Single],
    functions_rt: list[list[str]],
    elapsed: float,
) -> str:
    mode = "quick" if cfg.quick else "full"
    return "\n".join(
        [
            f"# Idempotency keys ({mode} run)",
            "",
            machine_line(version),
            "",
            f"The clients (this process), the uvicorn workers and the two Redis servers share "
            f"the {os.cpu_count()} cores: compare ratios, not absolute times.",
            "",
            WIRING,
            "",
            f"## 1. Runs per burst: {cfg.burst} concurrent duplicates, one key, one body, "
            f"handler {WORK_S * 1e3:g} ms; {cfg.bursts} burst(s) per row",
            "",
            table(BURST_HEADER, bursts),
            "",
            "HTTP rows: `httpx.AsyncClient`, every request on a new connection, all started "
            "at once; the handler counts its runs with `INCR` on a second Redis. *Got the "
            "first run's answer*: 2xx answers whose body is run 1's (the replays, and run 1's "
            "own answer); *2xx of another run*: answers of a second (third...) run. Requests "
            "that reach a worker after the run finished are plain replays, so how many "
            "overlap the run depends on how fast this machine opens the connections. Function "
            "rows: threads released together at an event (across processes: at a barrier), "
            "each calling the library's function API once; errors are exception types. "
            "Latency: the client's, over all the row's bursts.",
            "",
            f"## 2. Store round trips: a first request and its replays ({cfg.keys} keys per "
            "row, one worker, one keep-alive connection)",
            "",
            table(RT_HEADER, round_trip_rows(singles) + functions_rt),
            "",
            "Per request, on the records' Redis with nothing else talking to it: *round trips* "
            "are read events (`total_reads_processed`: one per request the server read, "
            "pipelined commands together), *commands sent* and *run inside scripts* from the "
            "slow log (`slowlog-log-slower-than 0`: every command; a script's own ones carry "
            "the address `?:0`). The counting's own commands were measured with nothing in "
            f"between and taken off; each count ends {SETTLE_S * 1e3:g} ms after the answer "
            "(idemkit records after answering). *Later replays*: the third request of a key "
            "(a local cache serves it once the run, or the first replay, filled it). The last "
            "rows are the function APIs, in this process.",
            "",
            f"## 3. Replay latency vs a bare route ({cfg.requests} sequential requests per "
            f"app on one keep-alive connection, {cfg.rounds} interleaved rounds)",
            "",
            table(LATENCY_HEADER, latency_rows(singles)),
            "",
            "One uvicorn worker per app, all up together; each app's requests replay one key "
            "whose first request ran before the rounds (the bare route runs its handler every "
            "time, with no sleep and no `INCR`: the least any answer from this app costs). "
            "Client: a small HTTP/1.1 client on asyncio streams (`Content-Length` or "
            "chunked). *Answers not the first run's*: non-2xx, or a body other than the first "
            "run's (should be 0).",
            "",
            f"Run took {elapsed:.0f} s.",
        ]
    )


# -- the command line -------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts (a CI smoke run)")
    parser.add_argument("--only", help=f"comma-separated, of {','.join(PEERS)} (default: all)")
    parser.add_argument("--bursts", type=int, help="bursts per row (quick 1, full 3)")
    parser.add_argument("--burst", type=int, help="requests per burst (quick 50, full 200)")
    parser.add_argument("--requests", type=int, help="timed replays per app (quick 100, full 500)")
    args = parser.parse_args(argv)
    only = {p.strip() for p in (args.only or ",".join(PEERS)).split(",") if p.strip()}
    if only - set(PEERS):
        parser.error(f"unknown --only {sorted(only - set(PEERS))}; pick from {list(PEERS)}")
    q = args.quick
    cfg = Config(
        quick=q,
        only=frozenset(only),
        workers=2 if q else 4,
        bursts=args.bursts or (1 if q else 3),
        burst=args.burst or (50 if q else 200),
        processes=2 if q else 4,
        requests=args.requests or (100 if q else 500),
        rounds=2 if q else 5,
        keys=3 if q else 10,
    )
    if not (1 <= cfg.bursts <= 10 and 4 <= cfg.burst <= 500 and 10 <= cfg.requests <= 5000):
        parser.error("out of range: --bursts 1..10, --burst 4..500, --requests 10..5000")
    from tests.support.redis_server import RedisServer

    started = time.monotonic()
    try:
        store_server, counter_server = RedisServer().start(), RedisServer().start()
    except Exception as exc:
        print(f"n/a: no Redis server ({reason(exc)})", file=sys.stderr)
        return 1
    with store_server, counter_server:
        progress(f"private redis-servers: {store_server.url} (records), {counter_server.url}")
        version = str(redis.Redis.from_url(store_server.url).info("server")["redis_version"])
        store = redis.Redis.from_url(store_server.url)
        counter = redis.Redis.from_url(counter_server.url)
        bursts = asyncio.run(measure_bursts(cfg, store_server.url, counter))
        bursts += function_bursts(cfg, store_server.url, counter)
        store.flushall()
        singles = asyncio.run(measure_single(cfg, store, store_server.url))
        functions_rt = function_round_trips(cfg, store, store_server.url, counter_server.url)
    print(report(cfg, version, bursts, singles, functions_rt, time.monotonic() - started))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
