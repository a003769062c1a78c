#!/usr/bin/env python
"""The FastAPI example service (4 uvicorn workers, hot key on Redis) against the same app
written with cashews and aiocache: req/s, p99, Redis commands per request, origin calls
per cold burst, requests that waited at expiry. DESIGN.md section 4, row "FastAPI service".

For each app, in one run, on one private ``redis-server`` (FLUSHALL between apps) and one
slow origin (``examples/service/origin.py``, 100 ms per request, on a thread here):

1. ``uvicorn <app> --workers 4`` (``examples.service.fleet.Service``), all workers up;
2. hot key: one request loads it, an unmeasured warm-up load opens every worker's
   pools, then ``--connections`` keep-alive connections read it as fast as they are
   answered for ``--hot-s`` seconds (``_http_load.py``). The key's TTL runs out during
   the run, as it would in production. req/s, p50/p99, and the private server's
   ``INFO commandstats`` / ``INFO cpu`` deltas over the run, per request;
3. cold bursts: ``--burst`` concurrent requests, each on a new connection, for a
   never-seen key (``examples.service.loadtest.burst``), ``--bursts`` times: the
   origin's own count of calls per burst;
4. expiry window: a fresh key, loaded by one request, then a steady load below
   saturation (``--steady-connections`` x ``--steady-rate`` req/s) for
   ``--expiry-s`` seconds, so it expires several times: requests that waited,
   i.e. whose cache call in the worker (``Server-Timing``) took half the origin's
   delay or more (and, apart, those the client saw that slow).

Apps: stampede is the example service itself (``examples.service.app:app``); the
peers are in ``benchmarks/fastapi_apps/`` and reuse its endpoints, origin client
and settings. Ratios are to cashews ``@cache`` (default ``protected=True``). With
``--rounds`` > 1, every app is started again for another hot-key run, in the
reverse order each round; cold bursts and the expiry window run in the first round.

    python benchmarks/bench_fastapi.py             # full: 7 apps, ~5 min on 2 cores
    python benchmarks/bench_fastapi.py --quick     # stampede, cashews, aiocache: < 60 s
    python benchmarks/bench_fastapi.py --only stampede,cashews [--hot-s 5 ...]

Markdown on stdout, progress on stderr. Timing never fails: exit status 0 whatever
the numbers (2 on bad arguments, 1 when no Redis server can be started).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import os
import platform
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's stampede, examples and tests.support
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import percentile, progress, reason, table  # noqa: E402
from _http_load import LoadResult, load  # noqa: E402

from examples.service.fleet import Service, total, worker_stats  # noqa: E402
from examples.service.loadtest import BurstResult, burst  # noqa: E402
from examples.service.origin import OriginServer  # noqa: E402

WORKERS = 4  # the number, whatever the cores
ORIGIN_DELAY = 0.1  # ANCHORS.md / ecosystem.md section 4: a 100 ms origin
REFERENCE = "cashews"
BURST_TTL = 60.0  # the cold bursts' service: no refresh can fall due during a burst


@dataclasses.dataclass(frozen=True)
class Variant:
    key: str  # for --only
    label: str
    app: str  # what uvicorn imports
    modules: tuple[str, ...]  # peers that must be installed
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)  # for its workers


VARIANTS = [
    Variant(
        "stampede",
        "stampede (the example app: `distributed=True`, `stale_ttl`)",
        "examples.service.app:app",
        (),
    ),
    Variant(
        "stampede-near",
        "stampede, the example app with `CACHE_NEAR_MAXSIZE=1000` (near cache)",
        "examples.service.app:app",
        (),
        {"CACHE_NEAR_MAXSIZE": "1000"},
    ),
    Variant(
        "cashews",
        "cashews `@cache(ttl)` (default `protected=True`)",
        "benchmarks.fastapi_apps.cashews_app:plain",
        ("cashews",),
    ),
    Variant(
        "cashews-early",
        "cashews `@cache.early(ttl + stale, early_ttl=ttl)`",
        "benchmarks.fastapi_apps.cashews_app:early",
        ("cashews",),
    ),
    Variant(
        "cashews-lock",
        "cashews `@cache(ttl, lock=True)`",
        "benchmarks.fastapi_apps.cashews_app:lock",
        ("cashews",),
    ),
    Variant(
        "aiocache",
        "aiocache `@cached(RedisCache, PickleSerializer)`",
        "benchmarks.fastapi_apps.aiocache_app:cached_app",
        ("aiocache",),
    ),
    Variant(
        "aiocache-stampede",
        "aiocache `@cached_stampede(lease=2)`",
        "benchmarks.fastapi_apps.aiocache_app:stampede_app",
        ("aiocache",),
    ),
    Variant(
        "floor",
        "floor: raw redis-py `GET` + pickle, no library, no protection",
        "benchmarks.fastapi_apps.floor_app:app",
        (),
    ),
]
QUICK_KEYS = ("stampede", "stampede-near", "cashews", "aiocache")


@dataclasses.dataclass(frozen=True)
class Config:
    quick: bool
    variants: list[Variant]
    rounds: int
    connections: int  # hot key: keep-alive connections, closed loop
    warm_s: float
    hot_s: float
    bursts: int
    burst: int  # requests per cold burst
    expiry_s: float
    steady_connections: int
    steady_rate: float  # requests per second per connection
    ttl: float
    stale_ttl: float

    @property
    def waited_s(self) -> float:
        """A request this slow waited for the origin (or for another's load of it)."""
        return ORIGIN_DELAY / 2


# -- Redis counters -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RedisDelta:
    calls: Counter[str]  # per command, INFO commandstats (commands run inside Lua included)
    usec: Counter[str]  # per command; a script's time includes its inner commands'
    cpu_s: float  # the server process's CPU (INFO cpu: user + sys)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


@dataclasses.dataclass(frozen=True)
class _Snapshot:
    calls: Counter[str]
    usec: Counter[str]
    cpu_s: float


class Observer:
    """``INFO commandstats`` and ``INFO cpu`` of the private server, before and after a run."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.own: Counter[str] = Counter()
        self.own = self.stop(self.start()).calls  # the observer's own INFO, taken off each delta

    def start(self) -> _Snapshot:
        info = self.client.info("commandstats", "cpu")
        calls: Counter[str] = Counter()
        usec: Counter[str] = Counter()
        for name, value in info.items():
            if name.startswith("cmdstat_"):
                calls[name.removeprefix("cmdstat_")] = int(value["calls"])
                usec[name.removeprefix("cmdstat_")] = int(value["usec"])
        return _Snapshot(calls, usec, float(info["used_cpu_user"]) + float(info["used_cpu_sys"]))

    def stop(self, before: _Snapshot) -> RedisDelta:
        after = self.start()
        return RedisDelta(
            after.calls - before.calls - self.own,
            after.usec - before.usec,
            after.cpu_s - before.cpu_s,
        )


# -- one app --------------------------------------------------------------------------------


@dataclasses.dataclass
class HotRun:
    load: LoadResult
    redis: RedisDelta
    origin_calls: int


@dataclasses.dataclass
class Expiry:
    load: LoadResult
    origin_calls: int
    waited_server: int  # cache call in the worker >= waited_s
    waited_client: int  # the client saw >= waited_s
    untimed: int  # answers without Server-Timing
    counters: dict[str, int] | None = None  # stampede only: its workers' /stats deltas


@dataclasses.dataclass
class Result:
    variant: Variant
    hot: list[HotRun] = dataclasses.field(default_factory=list)
    bursts: list[BurstResult] = dataclasses.field(default_factory=list)
    expiry: Expiry | None = None
    note: str = ""

    def per_second(self) -> float | None:
        return statistics.mean(r.load.per_second for r in self.hot) if self.hot else None

    def pooled(self) -> list[float]:
        """Hot-key latencies of every round, ascending."""
        return sorted(x for r in self.hot for x in r.load.latencies())


def _stamp() -> str:
    return uuid.uuid4().hex[:10]


async def _warm(service: Service, origin: OriginServer, product: str) -> None:
    first = await burst(service.url, origin.url, 1, product)  # one request: loads the key
    if first.ok != 1:
        raise RuntimeError(f"warming {product} failed: {first.errors[:1]}")


async def _hot(cfg: Config, service: Service, origin: OriginServer, observer: Observer) -> HotRun:
    product = f"hot-{_stamp()}"
    path = f"/products/{product}"
    await _warm(service, origin, product)
    # Unmeasured: connections, each worker's Redis and origin pools, Lua scripts.
    await load(service.host, service.port, path, connections=cfg.connections, duration=cfg.warm_s)
    calls_before = origin.calls(path)
    before = observer.start()
    run = await load(
        service.host, service.port, path, connections=cfg.connections, duration=cfg.hot_s
    )
    delta = observer.stop(before)
    return HotRun(run, delta, origin.calls(path) - calls_before)


# The example app's /stats counters that tell whether a request waited for a load.
WAIT_COUNTERS = ("misses", "coalesced", "lease_waits", "stale_served", "early_refreshes")


async def _counters(service: Service) -> dict[str, int] | None:
    stats = await worker_stats(service.url, WORKERS)
    if len(stats) < WORKERS:
        return None  # a worker not met: a delta would be wrong
    return {name: total(stats, name) for name in WAIT_COUNTERS}


async def _expiry(cfg: Config, service: Service, origin: OriginServer, stats: bool) -> Expiry:
    product = f"steady-{_stamp()}"
    path = f"/products/{product}"
    await _warm(service, origin, product)
    counted = await _counters(service) if stats else None
    calls_before = origin.calls(path)
    run = await load(
        service.host,
        service.port,
        path,
        connections=cfg.steady_connections,
        duration=cfg.expiry_s,
        rate=cfg.steady_rate,
    )
    calls = origin.calls(path) - calls_before
    after = await _counters(service) if counted is not None else None
    timed = [s.cache for s in run.samples if s.cache is not None]
    return Expiry(
        run,
        calls,
        sum(1 for t in timed if t >= cfg.waited_s),
        sum(1 for s in run.samples if s.latency >= cfg.waited_s),
        run.requests - len(timed),
        None if counted is None or after is None else {k: after[k] - counted[k] for k in after},
    )


async def _measure(
    cfg: Config,
    result: Result,
    redis_url: str,
    origin: OriginServer,
    observer: Observer,
    first_round: bool,
) -> None:
    variant = result.variant
    observer.client.flushall()
    options: dict[str, Any] = {
        "ttl": cfg.ttl,
        "stale_ttl": cfg.stale_ttl,
        "app": variant.app,
        "env": dict(variant.env),
    }
    with Service(redis_url, origin.url, WORKERS, **options) as service:
        pids = await service.wait_ready()
        progress(f"{variant.key}: {len(pids)} workers up; hot key {cfg.hot_s:g} s")
        result.hot.append(await _hot(cfg, service, origin, observer))
        if not first_round:
            return
        progress(f"{variant.key}: expiry window {cfg.expiry_s:g} s (TTL {cfg.ttl:g} s)")
        result.expiry = await _expiry(cfg, service, origin, variant.key.startswith("stampede"))
    # The bursts get a service of their own with a TTL far longer than a burst, as
    # examples.service.loadtest does: with the short TTL, a burst's last requests (a
    # second or more after its first on two busy cores) could meet a due refresh, and
    # the origin calls counted would not all be the cold load's.
    observer.client.flushall()
    options["ttl"] = BURST_TTL
    with Service(redis_url, origin.url, WORKERS, **options) as service:
        await service.wait_ready()
        progress(f"{variant.key}: {cfg.bursts} cold burst(s) of {cfg.burst} (TTL {BURST_TTL:g} s)")
        for _ in range(cfg.bursts):
            result.bursts.append(await burst(service.url, origin.url, cfg.burst))


def _missing(modules: tuple[str, ...]) -> str | None:
    for module in modules:
        if importlib.util.find_spec(module) is None:
            return module
    return None


async def run(cfg: Config) -> tuple[list[Result], str]:
    """Every variant of ``cfg``, measured; and the Redis server's version."""
    import redis

    from tests.support.redis_server import RedisServer

    results = [Result(v) for v in cfg.variants]
    with RedisServer() as server, OriginServer(ORIGIN_DELAY) as origin:
        client = redis.Redis.from_url(server.url)
        version = str(client.info("server")["redis_version"])
        observer = Observer(client)
        progress(f"private redis-server {version} on {server.url}; origin on {origin.url}")
        try:
            for n in range(cfg.rounds):
                order = results if n % 2 == 0 else results[::-1]
                for result in order:
                    missing = _missing(result.variant.modules)
                    if missing:
                        result.note = f"n/a (not installed: {missing})"
                    if result.note:
                        continue
                    try:
                        await _measure(cfg, result, server.url, origin, observer, n == 0)
                    except Exception as exc:
                        result.note = f"n/a: {reason(exc)}"
                        progress(f"{result.variant.key}: {result.note}")
        finally:
            client.close()
    return results, version


# -- report ---------------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:,.1f}"


def _x(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "n/a"
    return f"{value / reference:.2f}x"


def _reference(results: list[Result]) -> Result | None:
    return next((r for r in results if r.variant.key == REFERENCE and r.hot), None)


def _hot_row(r: Result, ref: Result | None) -> list[str]:
    if not r.hot:
        return [r.variant.label, *["n/a"] * 9, r.note]
    lat = r.pooled()
    p99 = percentile(lat, 0.99)
    requests = sum(h.load.requests for h in r.hot)
    calls: Counter[str] = sum((h.redis.calls for h in r.hot), Counter())
    usec = sum(sum(h.redis.usec.values()) for h in r.hot)
    cpu = sum(h.redis.cpu_s for h in r.hot)
    top = ", ".join(f"{n / requests:.2f} {name.upper()}" for name, n in calls.most_common(3))
    ref_rps = ref.per_second() if ref else None
    ref_p99 = percentile(ref.pooled(), 0.99) if ref else None
    runs = "/".join(f"{h.load.per_second:,.0f}" for h in r.hot)
    errors = sum(len(h.load.errors) for h in r.hot)
    return [
        r.variant.label,
        f"{r.per_second():,.0f} ({runs})",
        _x(r.per_second(), ref_rps),
        _ms(percentile(lat, 0.5)),
        _ms(p99),
        _x(p99, ref_p99),
        f"{sum(calls.values()) / requests:.2f} ({top})",
        f"{cpu * 1e6 / requests:.1f}",
        f"{usec / requests:.1f}",
        f"{sum(h.origin_calls for h in r.hot)}",
        (f"{errors} errors; " if errors else "") + r.note,
    ]


HOT_HEADER = [
    "app",
    "req/s, mean (runs)",
    "vs cashews",
    "p50 ms",
    "p99 ms",
    "p99 vs cashews",
    "Redis commands per request (top 3)",
    "Redis CPU µs per request",
    "commandstats µs per request",
    "origin calls",
    "note",
]


def _protection_row(r: Result, cfg: Config) -> list[str]:
    if not r.bursts or r.expiry is None:
        return [r.variant.label, *["n/a"] * 7, r.note]
    cold = sorted(x for b in r.bursts for x in b.latencies)
    cold_errors = sum(b.requests - b.ok for b in r.bursts)
    e = r.expiry
    lat = e.load.latencies()
    notes = []
    if cold_errors:
        notes.append(f"{cold_errors} burst errors")
    if e.load.errors:
        notes.append(f"{len(e.load.errors)} expiry-window errors")
    if e.untimed:
        notes.append(f"{e.untimed} answers without Server-Timing")
    if e.counters is not None:
        notes.append("workers' counters: " + _counters_text(e.counters))
    return [
        r.variant.label,
        " / ".join(str(b.origin_calls) for b in r.bursts),
        _ms(percentile(cold, 0.5)),
        _ms(percentile(cold, 0.99)),
        f"{e.waited_server} / {e.waited_client}",
        f"{e.load.requests:,}",
        f"{e.origin_calls}",
        f"{_ms(percentile(lat, 0.99))} / {_ms(lat[-1] if lat else None)}",
        "; ".join(n for n in (*notes, r.note) if n),
    ]


def _counters_text(c: dict[str, int]) -> str:
    return (
        f"{c['misses']} misses, {c['coalesced']} coalesced waits, {c['lease_waits']} lease "
        f"waits, {c['stale_served']} stale served, {c['early_refreshes']} early refreshes"
    )


def _protection_header(cfg: Config) -> list[str]:
    return [
        "app",
        f"cold: origin calls per {cfg.burst}-request burst",
        "cold p50 ms",
        "cold p99 ms",
        f"expiry: waited ≥ {cfg.waited_s * 1e3:g} ms (worker / client)",
        "expiry: requests",
        "expiry: origin calls",
        "expiry: p99 / max ms",
        "note",
    ]


def _targets(results: list[Result]) -> list[list[str]]:
    st = next((r for r in results if r.variant.key == "stampede"), None)
    ref = _reference(results)
    rows: list[list[str]] = []
    if st is None:
        return rows
    sr, rr = st.per_second(), ref.per_second() if ref else None
    ok = None if sr is None or rr is None else sr >= rr
    rows.append(
        [
            "req/s ≥ cashews `@cache`",
            f"{_ms(None) if sr is None else f'{sr:,.0f}'} vs "
            f"{'n/a' if rr is None else f'{rr:,.0f}'} ({_x(sr, rr)})",
            "n/a" if ok is None else "PASS" if ok else "MISS",
        ]
    )
    if st.expiry is not None:
        w = st.expiry.waited_server
        counted = st.expiry.counters
        rows.append(
            [
                "0 requests waiting at expiry",
                f"{w} (cache call in the worker ≥ half the origin delay); "
                f"{st.expiry.waited_client} by the client's clock"
                + ("" if counted is None else "; workers' counters: " + _counters_text(counted)),
                "PASS" if w == 0 else "MISS",
            ]
        )
    if st.bursts:
        calls = [b.origin_calls for b in st.bursts]
        rows.append(
            [
                "1 origin call per cold burst",
                " / ".join(map(str, calls)),
                "PASS" if all(c == 1 for c in calls) else "MISS",
            ]
        )
    return rows


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_line(redis_version: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    versions = ", ".join(
        f"{d} {_version(d)}"
        for d in ("stampede", "cashews", "aiocache", "fastapi", "starlette", "uvicorn", "redis")
    )
    return (
        f"{datetime.date.today().isoformat()}; {os.cpu_count()} cores ({cpu}), "
        f"{platform.system()} {platform.machine()}; CPython {platform.python_version()}; "
        f"redis-server {redis_version}; uvicorn loop {loop}, HTTP {http}; {versions}"
    )


def report(results: list[Result], cfg: Config, redis_version: str, elapsed: float) -> str:
    ref = _reference(results)
    mode = "quick" if cfg.quick else "full"
    lines = [
        f"## FastAPI service, {WORKERS} uvicorn workers, hot key on Redis ({mode} run)",
        "",
        machine_line(redis_version),
        "",
        f"The load generator (this process: `_http_load.py` and the `httpx` bursts), the "
        f"origin ({ORIGIN_DELAY * 1e3:g} ms per request, a thread here), {WORKERS} uvicorn "
        f"workers per app and Redis share the {os.cpu_count()} cores: compare ratios.",
        f"Settings: TTL {cfg.ttl:g} s, stale TTL {cfg.stale_ttl:g} s (stampede's `stale_ttl`, "
        f"cashews `early`'s extra life); {cfg.rounds} round(s).",
        "",
        f"### Hot key: {cfg.connections} keep-alive connections, {cfg.hot_s:g} s per run "
        f"(after {cfg.warm_s:g} s unmeasured)",
        "",
        table(HOT_HEADER, [_hot_row(r, ref) for r in results]),
        "",
        "Redis commands: `INFO commandstats` calls over the run / requests answered; they "
        "include the commands a Lua script runs inside Redis (a stampede hit is `GETRANGE` + "
        "`PTTL`, sent together: one round trip, two commands). Redis CPU: the "
        "server's `used_cpu_user + used_cpu_sys` over the run / requests (its whole cost, "
        "network I/O included). "
        "commandstats µs: the sum of `usec` over commands / requests, where a script's time "
        "already includes its inner commands', which count again on their own (an upper bound "
        "for script users). Origin calls: during the hot run, all workers together (the TTL "
        "runs out during it).",
        "",
        f"### Cold bursts and expiry: {cfg.bursts} burst(s); expiry window {cfg.expiry_s:g} s, "
        f"{cfg.steady_connections} connections x {cfg.steady_rate:g} req/s, TTL {cfg.ttl:g} s "
        f"(~{int(cfg.expiry_s // cfg.ttl)} expiries)",
        "",
        table(_protection_header(cfg), [_protection_row(r, cfg) for r in results]),
        "",
        f"Cold burst: {cfg.burst} concurrent requests on new connections for a never-seen key "
        f"(`examples.service.loadtest.burst`), origin calls counted by the origin; latencies "
        f"over all bursts. Expiry: a fresh key loaded by one request, then the steady load; "
        f"'waited' counts requests whose cache call in the worker (`Server-Timing`) took "
        f"{cfg.waited_s * 1e3:g} ms (half the origin's delay) or more, and apart those the "
        f"client saw that slow (its own scheduling on a busy machine included).",
        "",
        "### Target (DESIGN.md section 4, FastAPI service row)",
        "",
        table(["target", "measured", ""], _targets(results)),
        "",
        f"Run took {elapsed:.0f} s.",
    ]
    return "\n".join(lines)


# -- the command line -----------------------------------------------------------------------


def make_config(args: argparse.Namespace) -> Config:
    keys = [v.key for v in VARIANTS]
    if args.only:
        wanted = [k.strip() for k in args.only.split(",") if k.strip()]
        unknown = sorted(set(wanted) - set(keys))
        if unknown:
            raise ValueError(f"unknown --only {unknown}; pick from {keys}")
    else:
        wanted = list(QUICK_KEYS) if args.quick else keys
    variants = [v for v in VARIANTS if v.key in wanted]
    q = args.quick

    def pick(value: float | None, quick: float, full: float) -> float:
        return value if value is not None else quick if q else full

    return Config(
        quick=q,
        variants=variants,
        rounds=int(pick(args.rounds, 1, 2)),
        connections=int(pick(args.connections, 32, 64)),
        warm_s=pick(args.warm_s, 0.5, 1.0),
        hot_s=pick(args.hot_s, 3.0, 8.0),
        bursts=int(pick(args.bursts, 1, 3)),
        burst=int(pick(args.burst, 200, 200)),
        expiry_s=pick(args.expiry_s, 3.5, 8.0),
        steady_connections=16,
        steady_rate=pick(args.steady_rate, 25.0, 25.0),
        ttl=pick(args.ttl, 1.0, 2.0),
        stale_ttl=10.0,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 apps, short runs (< 60 s)")
    parser.add_argument("--only", help="comma-separated: " + ",".join(v.key for v in VARIANTS))
    parser.add_argument("--rounds", type=int, help="hot-key runs per app (quick 1, full 2)")
    parser.add_argument("--connections", type=int, help="hot-key connections (32 / 64)")
    parser.add_argument("--warm-s", type=float, help="unmeasured warm-up load (0.5 / 1 s)")
    parser.add_argument("--hot-s", type=float, help="hot-key run (3 / 8 s)")
    parser.add_argument("--bursts", type=int, help="cold bursts (1 / 3)")
    parser.add_argument("--burst", type=int, help="requests per cold burst (200)")
    parser.add_argument("--expiry-s", type=float, help="expiry window (3.5 / 8 s)")
    parser.add_argument("--steady-rate", type=float, help="req/s per connection (16 of them)")
    parser.add_argument("--ttl", type=float, help="CACHE_TTL of every app (1 / 2 s)")
    args = parser.parse_args(argv)
    try:
        cfg = make_config(args)
    except ValueError as exc:
        parser.error(str(exc))
    if not (
        1 <= cfg.rounds <= 5
        and 0 < cfg.hot_s <= 60
        and 0 < cfg.expiry_s <= 60
        and 0 < cfg.warm_s <= 10
        and 1 <= cfg.bursts <= 10
        and 1 <= cfg.burst <= 1000
        and 1 <= cfg.connections <= 256
        and 0 < cfg.steady_rate <= 1000
        and cfg.ttl > 0
    ):
        parser.error("a bound is out of range (see --help)")
    started = time.monotonic()
    try:
        results, version = asyncio.run(run(cfg))
    except Exception as exc:  # no Redis server: nothing to measure
        print(f"n/a: {reason(exc)}", file=sys.stderr)
        return 1
    print(report(results, cfg, version, time.monotonic() - started))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
