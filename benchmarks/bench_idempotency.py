#!/usr/bin/env python
"""Idempotency keys: stampede beside idemkit, AWS Lambda Powertools and fastapi-idempotency.

    python benchmarks/bench_idempotency.py [--quick] [--only stampede,idemkit,...]

Every library runs the same FastAPI app (``benchmarks/idem_apps/app.py``: one
``POST /orders`` route whose handler counts its runs with ``INCR`` on a second
Redis and takes 50 ms), on one private ``redis-server`` for the records (a free
loopback port, no persistence; a Redis already running on the machine is never
touched). stampede also runs on PostgreSQL: a private server
(``tests/support/pg_server.py``: a fresh cluster on a free loopback port, never the
machine's own), as ``AsyncIdempotency("postgresql://...")`` behind the same
middleware (the run counter stays on Redis), and at the function level with the
store's pool and in the caller's transaction (``do(key, fn, transaction=conn)``).
Four measures (issue 15):

1. **Runs per burst.** ``--burst`` (200) concurrent requests with one
   ``Idempotency-Key`` and one body, each on a new connection (``httpx``), to
   ``uvicorn --workers 4``, ``--bursts`` (3) times with a new key: handler runs per
   burst (ideal 1), answers that carry the first run's body (the replays, and the
   first run's own answer), 2xx answers of another run, and errors by status. The
   same at the function level: 200 threads released together in one process,
   then 4 processes x 50 threads, calling the library's function API
   (``idem_apps/functions.py``). In the caller's transaction every thread has its
   own connection and commits after ``do``, whose work also ``INSERT``s into an
   orders table: runs are counted as committed rows and as calls of the work.
2. **Store round trips** for a first request and its replays, one worker, on
   a keep-alive connection, nothing else talking to the records' Redis: read
   events (``total_reads_processed``: one per round trip), the commands the
   worker sent (the slow log, recording every command) and the commands Redis ran
   (``INFO commandstats``: a script's inner ones included), with the counting
   commands' own share measured and taken off. On PostgreSQL: the statements the
   server ran for the app's connections (``log_statement = 'all'`` while counting,
   told apart by ``application_name`` in the log lines; one statement per round
   trip), after warm-up requests (the one-time table check is not counted).
3. **Replay latency vs a bare route.** One worker per app, all apps up together;
   ``--requests`` (500) sequential replays per app on one keep-alive connection
   (a small HTTP/1.1 client here: httpx would add a few hundred µs of its own per
   request), in interleaved rounds; p50 / p99 and their ratios to the same route
   with no idempotency and a handler that does nothing (no sleep, no ``INCR``).
4. **Function level, a first call and its replay**, one after another in this
   process, p50 / p99: ``do`` on Redis and on the PostgreSQL pool around a
   transaction (``BEGIN``, an ``INSERT``, ``COMMIT``), and ``do(...,
   transaction=conn)`` inside that transaction, against the bare transaction.

Markdown on stdout, progress on stderr. Exit status 0 whatever the numbers and
whichever peer is missing (its rows show ``n/a`` and why; so do the PostgreSQL rows
without server binaries or psycopg); 1 when no Redis server can be started, 2 on
bad arguments.
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
    INSERT_ORDER,
    POSTGRES_LIBRARIES,
    close_calls,
    committed_rows,
    create_orders_table,
    make_call,
    serve,
    store_pool_closer,
    thread_burst,
)
from examples.service.fleet import Service  # noqa: E402

APP = "benchmarks.idem_apps.app:app"
WORK_S = 0.05  # the handler's time (the issue's ~50 ms)
BODY = {"order": 7, "amount": 500}
BARE = "bare"
SETTLE_S = 0.02  # after an answer, before counting what the server ran for it
REQUEST_TIMEOUT = 30.0  # an HTTP request not answered by then counts as an error


PG_MODULES = "psycopg,psycopg_pool"  # the PostgreSQL rows need both


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
    App("stampede-pg", "stampede `IdempotencyMiddleware` (PostgreSQL)", PG_MODULES, True),
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
    "stampede-pg": "stampede `Idempotency.do` (PostgreSQL, the store's pool)",
    "stampede-pg-tx": (
        "stampede `Idempotency.do(transaction=conn)` (PostgreSQL, in the caller's transaction)"
    ),
    "idemkit": "idemkit `@idempotent_sync` (`RedisBackend`)",
    "powertools": "Powertools `@idempotent_function` (Redis layer)",
}
FUNCTION_MODULES = {
    "stampede": None,
    "stampede-pg": PG_MODULES,
    "stampede-pg-tx": PG_MODULES,
    "idemkit": "idemkit",
    "powertools": "aws_lambda_powertools",
}
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
        return key == BARE or _peer(key) in self.only


def _peer(key: str) -> str:
    """The ``--only`` name of an app or function row (the PostgreSQL rows are stampede's)."""
    return "stampede" if key.startswith("stampede") else key.removesuffix("-local")


def _missing(modules: str | None) -> str | None:
    """``n/a (not installed: ...)`` if a module of ``modules`` (comma-separated) is not."""
    for module in (modules or "").split(","):
        if module and importlib.util.find_spec(module) is None:
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


def _names(counts: Counter[str], in_order: bool = False) -> str:
    """``counts`` as ``NAME xN, ...``: most first, then by name (``in_order``: in the
    order first seen, e.g. the statements of a PostgreSQL row)."""
    if not counts:
        return "none"
    items = list(counts.items())
    if not in_order:
        items.sort(key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(name + (f" x{n:g}" if abs(n - 1) > 1e-9 else "") for name, n in items)


# -- what the private PostgreSQL server ran ---------------------------------------------------

PG_DB = "stampede_bench"
PG_HTTP = "idem-bench-http"  # application_name of the HTTP app's connections
PG_FN = "idem-bench-fn"  # ... of the function rows' connections (store pool and callers')
PG_LAT = "idem-bench-latency"  # ... of the sequential latency measure's
PG_PREFIX = "@@pg|"  # log_line_prefix: "@@pg|<application_name>|<pid>|"
PG_NOT_SCRIPTS = "none (SQL statements)"
# Statements of the wake-up listener's thread (its LISTEN, its sweeps of expired rows):
# not the request's, left out of the counts (they happen once, then once a minute).
PG_BACKGROUND = ("LISTEN", "sweep")


@dataclasses.dataclass
class Pg:
    """The private PostgreSQL server of the PostgreSQL rows, or why there is none."""

    error: str | None = None
    server: Any = None
    version: str = ""

    def url(self, application: str) -> str:
        return f"{self.server.url(PG_DB)}?application_name={application}"

    @property
    def na(self) -> str:
        return f"n/a ({self.error})"


@contextlib.contextmanager
def postgres(cfg: Config) -> Iterator[Pg]:
    """A private PostgreSQL server (``tests/support/pg_server.py``: a fresh cluster in a
    temporary directory, on a free loopback port), with the database ``stampede_bench``
    and the orders table; or a ``Pg`` saying why not. Statements are logged only while
    ``PgProbe.logging()`` says so."""
    if not cfg.wants("stampede"):
        yield Pg(error="not asked for (--only)")
        return
    missing = _missing(PG_MODULES)
    if missing:
        yield Pg(error=missing.removeprefix("n/a (").removesuffix(")"))
        return
    from tests.support.pg_server import PostgresBinariesError, PostgresServer

    server = PostgresServer(
        settings={
            # 200 callers' own connections (the in-transaction bursts), the stores'
            # pools (up to 10 per process) and their listeners
            "max_connections": 400,
            "log_line_prefix": f"{PG_PREFIX}%a|%p|",
            "log_statement": "none",
        }
    )
    try:
        server.start()
    except PostgresBinariesError as exc:  # its first sentence: the rest is how to get them
        yield Pg(error=str(exc).split(";")[0])
        return
    except Exception as exc:
        yield Pg(error=f"no PostgreSQL server: {reason(exc)}")
        return
    with server:
        pg = Pg(server=server, version=".".join(map(str, server.binaries.version)))
        try:
            server.create_database(PG_DB)
            create_orders_table(pg.url("idem-bench-setup"))
        except Exception as exc:
            pg = Pg(error=f"PostgreSQL setup: {reason(exc)}")
        progress(f"private PostgreSQL {pg.version}: {server.url(PG_DB)}")
        yield pg


def _pg_kind(sql: str) -> str:
    """What a logged statement of stampede's store (or of the caller) is."""
    text = " ".join(sql.split())
    if "claimed AS (" in text:
        return "claim"
    if "WITH done AS (" in text:
        return "record"  # the outcome written (or the claim released), and its NOTIFY
    if text.startswith("UPDATE stampede_idempotency SET lease_until"):
        return "renew"
    if text.startswith("DELETE FROM stampede_idempotency"):
        return "sweep"
    if text.startswith("SELECT to_regclass"):
        return "table check"
    if "pg_advisory_xact_lock" in text or text.startswith("CREATE"):
        return "table creation"
    if text.startswith("INSERT INTO bench_orders"):
        return "INSERT (the work's)"
    return text.split(" ", 1)[0].upper() if text else "?"


class PgProbe:
    """The statements the private PostgreSQL server ran for some applications
    (``application_name``) between ``start()`` and ``stop()``, from its log
    (``log_statement = 'all'`` while ``logging()``; ``log_line_prefix`` names the
    application). Each is one round trip: psycopg sends one statement per
    ``execute`` (autocommit, or the caller's transaction with its ``BEGIN``)."""

    def __init__(self, pg: Pg, applications: Sequence[str]) -> None:
        self.server = pg.server
        self.applications = set(applications)
        self.background: Counter[str] = Counter()  # the listener's, left out

    @contextlib.contextmanager
    def logging(self) -> Iterator[PgProbe]:
        self.server.execute("ALTER SYSTEM SET log_statement = 'all'", "SELECT pg_reload_conf()")
        time.sleep(0.3)  # every backend reloads before its next statement
        try:
            yield self
        finally:
            self.server.execute("ALTER SYSTEM RESET log_statement", "SELECT pg_reload_conf()")

    def start(self) -> int:
        return os.path.getsize(self.server.log_path)

    def stop(self, before: int) -> Seen:
        with open(self.server.log_path, "rb") as fh:
            fh.seek(before)
            text = fh.read().decode(errors="replace")
        entries: list[str] = []
        for line in text.splitlines():
            if line.startswith(PG_PREFIX):
                entries.append(line)
            elif entries:  # a statement's next line
                entries[-1] += "\n" + line
        seen = Seen()
        for entry in entries:
            application, _pid, message = entry[len(PG_PREFIX) :].split("|", 2)
            if application not in self.applications:
                continue
            if message.startswith("LOG:  statement: "):
                sql = message[len("LOG:  statement: ") :]
            elif message.startswith("LOG:  execute "):
                sql = message.split(": ", 2)[-1]
            else:
                continue
            kind = _pg_kind(sql)
            if kind in PG_BACKGROUND:
                self.background[kind] += 1
                continue
            seen.reads += 1
            seen.sent[kind] += 1
        return seen


# -- measure 1: bursts ----------------------------------------------------------------------


@dataclasses.dataclass
class Burst:
    runs: int
    first: int  # answers with the first run's value (body)
    other: int  # 2xx (values) of another run
    errors: Counter[str]
    latencies: list[float] = dataclasses.field(default_factory=list)  # the client's
    rows: int | None = None  # committed business rows (the in-transaction rows)


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
    cfg: Config, app: App, workers: int, store_url: str, counter: redis.Redis, pg: Pg
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
            **_pg_env(app, pg),
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


def _pg_env(app: App, pg: Pg) -> dict[str, str]:
    return {"IDEM_PG_URL": pg.url(PG_HTTP)} if app.key == "stampede-pg" else {}


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
    runs = " / ".join(str(b.runs) for b in bursts)
    if any(b.rows is not None for b in bursts):
        rows = " / ".join(str(b.rows) for b in bursts)
        runs = f"{rows} committed (work called {runs})"
    return [
        label,
        surface,
        runs,
        _num(sum(b.first for b in bursts) / n),
        _num(sum(b.other for b in bursts) / n),
        ", ".join(f"{what} x{_num(count / n)}" for what, count in errors.most_common()) or "0",
        f"{percentile(lat, 0.5) * 1e3:.0f} / {lat[-1] * 1e3:.0f}" if lat else "",
    ]


async def measure_bursts(
    cfg: Config, store_url: str, counter: redis.Redis, pg: Pg
) -> list[list[str]]:
    rows = []
    plan = [(a, cfg.workers) for a in APPS if a.burst and cfg.wants(a.key)]
    if cfg.wants("fastapi-idempotency") and not cfg.quick:
        # Its store is per process: one worker shows what it does where it can work.
        plan.append((next(a for a in APPS if a.key == "fastapi-idempotency"), 1))
    for app, workers in plan:
        surface = f"HTTP, {workers} worker{'s' if workers > 1 else ''}"
        missing = _missing(app.module) or (pg.na if app.key == "stampede-pg" and pg.error else None)
        if missing:
            rows.append(_burst_row(app.label, surface, missing))
            continue
        progress(f"bursts: {app.key}, {workers} worker(s)")
        try:
            bursts = await _http_bursts(cfg, app, workers, store_url, counter, pg)
            rows.append(_burst_row(app.label, surface, bursts))
        except Exception as exc:
            rows.append(_burst_row(app.label, surface, f"n/a ({reason(exc)})"))
    return rows


def _function_missing(lib: str, pg: Pg) -> str | None:
    """Why ``lib``'s function rows cannot run here (a peer not installed, no PostgreSQL)."""
    missing = _missing(FUNCTION_MODULES[lib])
    if missing is None and lib in POSTGRES_LIBRARIES and pg.error:
        return pg.na
    return missing


def _store_for(lib: str, store_url: str, pg: Pg) -> str:
    return pg.url(PG_FN) if lib in POSTGRES_LIBRARIES else store_url


def _burst_of(lib: str, ns: str, key: str, counter: redis.Redis, pg: Pg, outcomes: Any) -> Burst:
    """The tally of one function burst: the work's calls (its ``INCR``) and, in the
    caller's transaction, the business rows committed."""
    burst = _tally(int(counter.get(f"runs:{ns}:{key}") or 0), outcomes)
    if lib == "stampede-pg-tx":
        burst.rows = committed_rows(pg.url("idem-bench-count"), ns, key)
    return burst


def function_bursts(cfg: Config, store_url: str, counter: redis.Redis, pg: Pg) -> list[list[str]]:
    rows = []
    libraries = [lib for lib in FUNCTION_LIBRARIES if cfg.wants(lib)]
    for lib in libraries:
        label = FUNCTION_LABELS[lib]
        surface = f"function, {cfg.burst} threads"
        missing = _function_missing(lib, pg)
        if missing:
            rows.append(_burst_row(label, surface, missing))
            continue
        progress(f"bursts: {lib}, threads")
        ns = f"t-{lib}-{uuid.uuid4().hex[:6]}"
        try:
            url = _store_for(lib, store_url, pg)
            call = make_call(lib, url, _url(counter), ns, WORK_S, cfg.burst)
            thread_burst(call, f"warm-{uuid.uuid4().hex[:8]}", dict(BODY), 4, 30)
            bursts = []
            for _ in range(cfg.bursts):
                key = f"burst-{uuid.uuid4().hex[:12]}"
                outcomes = thread_burst(call, key, dict(BODY), cfg.burst, REQUEST_TIMEOUT)
                bursts.append(_burst_of(lib, ns, key, counter, pg, outcomes))
            rows.append(_burst_row(label, surface, bursts))
        except Exception as exc:
            rows.append(_burst_row(label, surface, f"n/a ({reason(exc)})"))
        finally:
            close_calls()  # (the in-transaction callers' 200 connections)
    if cfg.processes > 1 and libraries:
        rows += _process_bursts(cfg, libraries, store_url, counter, pg)
    if cfg.wants(NO_FUNCTION_API[0]):
        rows.append(_burst_row(NO_FUNCTION_API[0], "function", NO_FUNCTION_API[1]))
    return rows


def _process_bursts(
    cfg: Config, libraries: list[str], store_url: str, counter: redis.Redis, pg: Pg
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
            args=(
                store_url,
                None if pg.error else pg.url(PG_FN),
                _url(counter),
                ns,
                WORK_S,
                threads,
                q,
                results,
                barrier,
            ),
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
            missing = _function_missing(lib, pg)
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
                    bursts.append(_burst_of(lib, ns, key, counter, pg, outcomes))
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
def _services(apps: list[App], store_url: str, pg: Pg) -> Iterator[list[Single]]:
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
                     "IDEM_COUNT": "0", **_pg_env(app, pg)},
            )  # fmt: skip
            singles.append(Single(app, service.start()))
        yield singles
    finally:
        for single in singles:
            single.service.stop()
            single.service.remove_log()


async def _round_trips(single: Single, probe: Probe | PgProbe, keys: int) -> None:
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


def _app_missing(app: App, pg: Pg) -> str | None:
    missing = _missing(app.module)
    if missing is None and app.key == "stampede-pg" and pg.error:
        return pg.na
    return missing


async def measure_single(cfg: Config, store: redis.Redis, store_url: str, pg: Pg) -> list[Single]:
    apps = [a for a in APPS if cfg.wants(a.key)]
    runnable = [a for a in apps if _app_missing(a, pg) is None]
    progress(f"one worker each: {', '.join(a.key for a in runnable)}")
    with _services(runnable, store_url, pg) as singles:
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
                if single.app.key == "stampede-pg":
                    # Its statements on the private PostgreSQL server, logged meanwhile.
                    with PgProbe(pg, [PG_HTTP]).logging() as pg_probe:
                        await _round_trips(single, pg_probe, cfg.keys)
                else:
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
        Single(a, Service("", ""), error=_app_missing(a, pg)) for a in apps if a not in runnable
    ]
    return sorted(singles + missing, key=lambda s: APPS.index(s.app))


def _rt_cell(seen: Seen, in_order: bool = False) -> str:
    return f"{seen.reads:.1f}: {_names(seen.sent, in_order)}"


def round_trip_rows(singles: list[Single]) -> list[list[str]]:
    rows = []
    for s in singles:
        if s.error:
            rows.append([s.app.label, s.error, "", "", ""])
            continue
        if s.app.key == "fastapi-idempotency":
            rows.append([s.app.label, NO_REDIS_STORE, "", "", ""])
            continue
        pg_row = s.app.key == "stampede-pg"
        rows.append(
            [
                s.app.label,
                _rt_cell(s.first, pg_row),
                _rt_cell(s.replay1, pg_row),
                _rt_cell(s.replays, pg_row),
                PG_NOT_SCRIPTS
                if pg_row
                else f"{_names(s.first.scripted)} / {_names(s.replays.scripted)}",
            ]
        )
    return rows


def function_round_trips(
    cfg: Config, store: redis.Redis, store_url: str, counter_url: str, pg: Pg
) -> list[list[str]]:
    """The same counts for the function APIs, in this process (the PostgreSQL rows:
    the statements the server ran for them, the caller's own transaction included)."""
    rows = []
    probe = Probe(store)
    for lib in FUNCTION_LIBRARIES:
        if not cfg.wants(lib):
            continue
        label = FUNCTION_LABELS[lib]
        missing = _function_missing(lib, pg)
        if missing:
            rows.append([label, missing, "", "", ""])
            continue
        try:
            with contextlib.ExitStack() as stack:
                counting: Probe | PgProbe = probe
                if lib in POSTGRES_LIBRARIES:
                    counting = stack.enter_context(PgProbe(pg, [PG_FN]).logging())
                ns = f"f-{lib}-{uuid.uuid4().hex[:6]}"
                call = make_call(lib, _store_for(lib, store_url, pg), counter_url, ns, 0.0)
                warm = f"warm-{uuid.uuid4().hex[:8]}"
                for _ in range(3):
                    call(warm, dict(BODY))
                phases = [Seen(), Seen(), Seen()]
                for i in range(cfg.keys):
                    key = f"rt-{i}-{uuid.uuid4().hex[:8]}"
                    for p in range(3):
                        before = counting.start()
                        call(key, dict(BODY))
                        if lib in POSTGRES_LIBRARIES:
                            time.sleep(SETTLE_S)  # (the server's log written)
                        phases[p] += counting.stop(before)
            first, replay1, replays = (p.per(cfg.keys) for p in phases)
            rows.append(
                [
                    label,
                    _rt_cell(first, lib in POSTGRES_LIBRARIES),
                    _rt_cell(replay1, lib in POSTGRES_LIBRARIES),
                    _rt_cell(replays, lib in POSTGRES_LIBRARIES),
                    PG_NOT_SCRIPTS
                    if lib in POSTGRES_LIBRARIES
                    else f"{_names(first.scripted)} / {_names(replays.scripted)}",
                ]
            )
        except Exception as exc:
            rows.append([label, f"n/a ({reason(exc)})", "", "", ""])
        finally:
            close_calls()
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


# -- function level: a first call and a replay, one after another -------------------------------

BARE_TX = "bare transaction"


@dataclasses.dataclass
class Timed:
    label: str
    first: list[float] = dataclasses.field(default_factory=list)
    replay: list[float] = dataclasses.field(default_factory=list)
    unexpected: int = 0  # a first call that replayed, or a replay that ran
    error: str | None = None


def function_latency(cfg: Config, store_url: str, pg: Pg) -> list[Timed]:
    """Sequential calls in this process: for each key a first call, then its replay.

    The work is the same transaction everywhere: ``BEGIN``, one ``INSERT`` into
    ``bench_orders``, ``COMMIT``. The bare transaction has no idempotency; Redis and
    the PostgreSQL pool wrap it in ``do`` (the work's transaction on a connection of
    its own); in the caller's transaction ``do(..., transaction=conn)`` runs between
    the ``BEGIN`` and the ``COMMIT`` and the work is the ``INSERT`` alone."""
    labels = {
        BARE_TX: "bare transaction (`BEGIN`, `INSERT`, `COMMIT`; no idempotency)",
        "stampede": "`do` on Redis, the transaction as its work",
        "stampede-pg": "`do` on PostgreSQL (the store's pool), the transaction as its work",
        "stampede-pg-tx": "`BEGIN`, `do(..., transaction=conn)` with the `INSERT` as its "
        "work, `COMMIT`",
    }
    if not cfg.wants("stampede"):
        return []
    wanted = list(labels)
    if pg.error:
        return [Timed(labels[k], error=pg.na) for k in wanted]
    import psycopg

    import stampede

    ns = f"l-{uuid.uuid4().hex[:6]}"
    body = dict(BODY)
    text = json.dumps(body, sort_keys=True)
    url = pg.url(PG_LAT)
    timed = {k: Timed(labels[k]) for k in wanted}
    with contextlib.ExitStack() as stack:
        conn = stack.enter_context(psycopg.connect(url))  # autocommit off: transactions
        work_conn = stack.enter_context(psycopg.connect(url))
        redis_idem = stampede.Idempotency(redis.Redis.from_url(store_url), namespace=ns)
        pg_idem = stampede.Idempotency(url, namespace=ns)
        stack.callback(store_pool_closer(pg_idem))

        def transaction(c: Any, key: str) -> dict[str, Any]:
            c.execute(INSERT_ORDER, (ns, key, 1, text))
            c.commit()
            return {"order": key}

        def bare(key: str) -> bool:
            transaction(conn, key)
            return False

        def on_redis(key: str) -> bool:
            return redis_idem.do(key, lambda: transaction(work_conn, key), fingerprint=body)[1]

        def on_pool(key: str) -> bool:
            return pg_idem.do(key, lambda: transaction(work_conn, key), fingerprint=body)[1]

        def insert(key: str) -> dict[str, Any]:
            conn.execute(INSERT_ORDER, (ns, key, 1, text))
            return {"order": key}

        def in_transaction(key: str) -> bool:
            try:
                _, replayed = pg_idem.do(
                    key, lambda: insert(key), fingerprint=body, transaction=conn
                )
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
            return replayed

        calls = {
            BARE_TX: bare,
            "stampede": on_redis,
            "stampede-pg": on_pool,
            "stampede-pg-tx": in_transaction,
        }
        order = list(timed)
        for key_name in order:  # unmeasured: connections, the table check, prepared statements
            try:
                for i in range(20):
                    calls[key_name](f"warm-{i}-{uuid.uuid4().hex[:8]}")
            except Exception as exc:
                timed[key_name].error = f"n/a ({reason(exc)})"
        live = [k for k in order if timed[k].error is None]
        per_round = max(1, cfg.requests // cfg.rounds)
        for r in range(cfg.rounds):
            progress(f"function latency, round {r + 1} of {cfg.rounds}")
            for name in live if r % 2 == 0 else live[::-1]:
                row, call = timed[name], calls[name]
                try:
                    for _ in range(per_round):
                        key = f"lat-{uuid.uuid4().hex[:12]}"
                        t0 = time.perf_counter()
                        replayed = call(key)
                        row.first.append(time.perf_counter() - t0)
                        row.unexpected += replayed
                        if name == BARE_TX:
                            continue
                        t0 = time.perf_counter()
                        replayed = call(key)
                        row.replay.append(time.perf_counter() - t0)
                        row.unexpected += not replayed
                except Exception as exc:
                    row.error = f"n/a ({reason(exc)})"
            live = [k for k in live if timed[k].error is None]
    return list(timed.values())


FN_LATENCY_HEADER = [
    "mode",
    "first call p50 µs",
    "p99 µs",
    "replay p50 µs",
    "p99 µs",
    "first p50 vs bare transaction",
    "first p50 minus bare (µs)",
    "replay p50 vs bare transaction",
    "calls not as expected",
]


def function_latency_rows(timed: list[Timed]) -> list[list[str]]:
    def p(values: list[float], q: float) -> float:
        return float(percentile(sorted(values), q))

    bare = next((t for t in timed if t.label.startswith("bare") and t.first), None)
    ref = p(bare.first, 0.5) if bare else None
    rows = []
    for t in timed:
        if t.error or not t.first:
            rows.append([t.label, t.error or "n/a", *[""] * (len(FN_LATENCY_HEADER) - 2)])
            continue
        first50 = p(t.first, 0.5)
        replay = bool(t.replay)
        rows.append(
            [
                t.label,
                f"{first50 * 1e6:,.0f}",
                f"{p(t.first, 0.99) * 1e6:,.0f}",
                f"{p(t.replay, 0.5) * 1e6:,.0f}" if replay else "(a retry runs it again)",
                f"{p(t.replay, 0.99) * 1e6:,.0f}" if replay else "",
                f"{first50 / ref:.2f}x" if ref else "n/a",
                f"{(first50 - ref) * 1e6:+,.0f}" if ref else "n/a",
                f"{p(t.replay, 0.5) / ref:.2f}x" if ref and replay else "",
                str(t.unexpected),
            ]
        )
    return rows


# -- the report -------------------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_line(redis_version: str, pg: Pg) -> str:
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
        "starlette", "uvicorn", "httpx", "redis", "psycopg", "psycopg-pool",
    )  # fmt: skip
    versions = ", ".join(f"{d} {_version(d)}" for d in dists)
    return (
        f"{datetime.date.today().isoformat()}; {os.cpu_count()} cores ({cpu}); "
        f"CPython {platform.python_version()}; redis-server {redis_version}; "
        f"PostgreSQL {pg.version or pg.na}; "
        f"uvicorn loop {loop}, HTTP {http}; {versions}"
    )


WIRING = (
    "Wiring (`benchmarks/idem_apps/`), every library with its defaults unless said: "
    "stampede: `stampede.asgi.IdempotencyMiddleware` over `AsyncIdempotency(redis.asyncio."
    "Redis)` (wait and replay, 10 s lease renewed), and over `AsyncIdempotency("
    '"postgresql://...")` (the PostgreSQL rows: a private server, the store\'s own pool, '
    "the handler's run counter still on Redis); idemkit: its ASGI "
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
    timed: list[Timed],
    pg: Pg,
    elapsed: float,
) -> str:
    mode = "quick" if cfg.quick else "full"
    return "\n".join(
        [
            f"# Idempotency keys ({mode} run)",
            "",
            machine_line(version, pg),
            "",
            f"The clients (this process), the uvicorn workers, the two Redis servers and the "
            f"PostgreSQL server share the {os.cpu_count()} cores: compare ratios, not absolute "
            "times.",
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
            "In the caller's transaction each thread has a connection of its own (opened "
            "before the burst), calls `do(key, work, transaction=conn)` whose work also "
            "`INSERT`s the order in that transaction, then commits: *committed* counts the "
            "orders' rows after the burst, *work called* every run of the work, a "
            "rolled-back one included. Latency: the client's, over all the row's bursts.",
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
            "rows are the function APIs, in this process. PostgreSQL rows: the statements the "
            "private server ran for the app's connections (`log_statement = 'all'` while "
            "counting, `application_name` in the log line's prefix; psycopg sends one "
            "statement per round trip): *claim* (one `INSERT ... ON CONFLICT DO UPDATE ... "
            "RETURNING`, reading the row when it is not free), *record* (the outcome written "
            "and its `NOTIFY`); in the caller's transaction also its `BEGIN`, the work's "
            "`INSERT` and its `COMMIT`. Not counted: the one-time table check (3 warm-up "
            "requests before counting), the wake-up listener thread's own `LISTEN` and "
            "sweeps of expired rows, and the one extra round trip psycopg spends preparing a "
            "statement on its 5th use on a connection (a `Parse`, not a statement run).",
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
            f"## 4. Function level: a first call and its replay, one after another "
            f"({cfg.requests} keys per row, {cfg.rounds} interleaved rounds)",
            "",
            table(FN_LATENCY_HEADER, function_latency_rows(timed))
            if timed
            else "(not asked for: --only without stampede)",
            "",
            "In this process, on the private PostgreSQL server (and the records' Redis for "
            "the Redis row), each key's first call then its replay. The work is the same "
            "transaction in every row, one `INSERT` into an orders table; the bare "
            "transaction has no idempotency (its retry would insert again). *Replay p50 vs "
            "bare transaction*: what answering a retry costs against doing the work. "
            "*Calls not as expected*: a first call that replayed or a replay that ran "
            "(should be 0).",
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
    parser.add_argument(
        "--requests",
        type=int,
        help="timed replays per app, and keys per row of measure 4 (quick 100, full 500)",
    )
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
    with store_server, counter_server, postgres(cfg) as pg:
        progress(f"private redis-servers: {store_server.url} (records), {counter_server.url}")
        if pg.error:
            progress(f"PostgreSQL rows: {pg.na}")
        version = str(redis.Redis.from_url(store_server.url).info("server")["redis_version"])
        store = redis.Redis.from_url(store_server.url)
        counter = redis.Redis.from_url(counter_server.url)
        bursts = asyncio.run(measure_bursts(cfg, store_server.url, counter, pg))
        bursts += function_bursts(cfg, store_server.url, counter, pg)
        store.flushall()
        singles = asyncio.run(measure_single(cfg, store, store_server.url, pg))
        functions_rt = function_round_trips(cfg, store, store_server.url, counter_server.url, pg)
        timed = function_latency(cfg, store_server.url, pg)
    elapsed = time.monotonic() - started
    print(report(cfg, version, bursts, singles, functions_rt, timed, pg, elapsed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
