"""Load test of the example service: a cold-key burst and a hot key expiring under load.

Two scenarios, each bounded in requests and time, with a real HTTP client:

- burst: N requests for one cold product at once. Reports the origin calls
  (stampede: 1, for every worker together), the workers that answered, the
  distinct payloads (1) and the latencies (about one origin delay each).
- hot key: C clients read one product in a loop for D seconds while its TTL
  (short, e.g. 1 s) runs out again and again. Reports the origin calls (about
  one per TTL), the expiries crossed, the refreshes seen (distinct versions of
  the product) and the requests that took at least the origin delay, i.e.
  that waited for the origin (stampede: none).

Against a running service and origin::

    python -m examples.service.loadtest --service http://127.0.0.1:8000 \\
        --origin http://127.0.0.1:8081

Or all of it on this machine, with one command (a private redis-server on a
free port, the origin on a thread, uvicorn with --workers N, twice: TTL 60 s
for the burst, TTL 1 s for the hot key)::

    python -m examples.service.loadtest --self-contained

``burst`` and ``hot_key`` (and ``fleet.Service``) are what
tests/test_example_service.py runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import httpx

from .fleet import Service, total, worker_stats

MAX_BURST = 2000
MAX_CLIENTS = 200
MAX_DURATION = 120.0

# stampede never refreshes a value before this share of its TTL has passed
# (stampede._entry.MIN_FRESH_SHARE), whatever the XFetch draw says.
MIN_FRESH_SHARE = 0.5


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank; 0.0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f}"


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table, columns padded; the first left-aligned, the others right."""
    table = [list(header), *(list(r) for r in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = []
    for n, row in enumerate(table):
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if n == 0:
            marks = [("-" * w if i == 0 else "-" * (w - 1) + ":") for i, w in enumerate(widths)]
            lines.append("|" + "|".join(f" {m} " for m in marks) + "|")
    return "\n".join(lines)


# -- the origin's counters, over HTTP (works for a standalone origin too) ----------------


async def origin_snapshot(client: httpx.AsyncClient, origin_url: str) -> dict[str, Any]:
    response = await client.get(f"{origin_url}/_counts")
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


async def origin_calls(client: httpx.AsyncClient, origin_url: str, path: str) -> int:
    counts = (await origin_snapshot(client, origin_url))["counts"]
    return int(counts.get(path, 0))


# -- the scenarios ---------------------------------------------------------------------


@dataclass
class Reply:
    """One request as the client saw it."""

    started: float  # time.monotonic() when sent
    latency: float  # seconds until the whole response was read
    status: int  # 0: no response (the error says why)
    pid: int | None = None
    product: dict[str, Any] | None = None
    server: float | None = None  # seconds in the cache call, in the worker (Server-Timing)
    error: str | None = None


def server_timing(header: str | None, metric: str = "cache") -> float | None:
    """Seconds of ``metric`` in a ``Server-Timing`` header (``cache;dur=1.234``, in ms)."""
    for part in (header or "").split(","):
        name, *params = (p.strip() for p in part.split(";"))
        if name != metric:
            continue
        for param in params:
            key, _, value = param.partition("=")
            if key.strip() == "dur":
                try:
                    return float(value) / 1000
                except ValueError:
                    return None
    return None


async def _get(client: httpx.AsyncClient, url: str) -> Reply:
    started = time.monotonic()
    t0 = time.perf_counter()
    try:
        response = await client.get(url)
        body = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        return Reply(started, time.perf_counter() - t0, 0, error=f"{type(exc).__name__}: {exc}")
    latency = time.perf_counter() - t0
    if response.status_code != 200:
        return Reply(started, latency, response.status_code, error=str(body)[:200])
    server = server_timing(response.headers.get("server-timing"))
    return Reply(started, latency, 200, body.get("pid"), body.get("product"), server)


def _payload(reply: Reply) -> str:
    return json.dumps(reply.product, sort_keys=True)


@dataclass
class BurstResult:
    product_id: str
    replies: list[Reply]
    origin_calls: int

    @property
    def requests(self) -> int:
        return len(self.replies)

    @property
    def ok(self) -> int:
        return sum(1 for r in self.replies if r.status == 200)

    @property
    def errors(self) -> list[str]:
        return [r.error or str(r.status) for r in self.replies if r.status != 200]

    @property
    def pids(self) -> Counter[int]:
        return Counter(r.pid for r in self.replies if r.pid is not None)

    @property
    def payloads(self) -> set[str]:
        return {_payload(r) for r in self.replies if r.status == 200}

    @property
    def latencies(self) -> list[float]:
        return [r.latency for r in self.replies]

    @property
    def send_spread(self) -> float:
        """Seconds between the first and the last request sent."""
        starts = [r.started for r in self.replies]
        return max(starts) - min(starts) if starts else 0.0

    def row(self, label: str = "cold key") -> list[str]:
        lat = self.latencies
        return [
            label,
            f"{self.requests:,}",
            f"{self.ok:,}",
            f"{self.origin_calls:,}",
            f"{len(self.pids)}",
            f"{len(self.payloads)}",
            ms(percentile(lat, 0.5)),
            ms(percentile(lat, 0.99)),
            ms(max(lat, default=0.0)),
        ]


BURST_HEADER = [
    "burst",
    "requests",
    "ok",
    "origin calls",
    "workers answering",
    "distinct payloads",
    "p50 ms",
    "p99 ms",
    "max ms",
]


async def burst(
    service_url: str,
    origin_url: str,
    n: int = 200,
    product_id: str | None = None,
    *,
    in_flight: Callable[[], Awaitable[object]] | None = None,
) -> BurstResult:
    """``n`` concurrent requests for one cold product, each on its own connection.

    ``in_flight``, if given, is awaited once the requests are sent and before
    their answers are collected (a test releases a held origin there).
    """
    if not 1 <= n <= MAX_BURST:
        raise ValueError(f"a burst is 1..{MAX_BURST} requests, not {n}")
    product_id = product_id or f"burst-{uuid.uuid4().hex[:12]}"
    path = f"/products/{product_id}"
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(limits=limits, timeout=30.0) as client:
        before = await origin_calls(client, origin_url, path)
        tasks = [asyncio.ensure_future(_get(client, service_url + path)) for _ in range(n)]
        try:
            if in_flight is not None:
                await in_flight()
            replies = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()  # only those still running: after an error in in_flight
            await asyncio.gather(*tasks, return_exceptions=True)
        after = await origin_calls(client, origin_url, path)
    return BurstResult(product_id, list(replies), after - before)


@dataclass
class HotKeyResult:
    product_id: str
    clients: int
    duration: float  # seconds the clients kept reading
    ttl: float
    origin_delay: float
    replies: list[Reply]
    origin_calls: int  # during the run, the warming load excluded
    warm_version: int | None = None
    warm_sent: float = 0.0  # time.monotonic() when the warming request was sent
    end: float = 0.0  # time.monotonic() after which no client sent a request

    @property
    def requests(self) -> int:
        return len(self.replies)

    @property
    def ok(self) -> int:
        return sum(1 for r in self.replies if r.status == 200)

    @property
    def errors(self) -> list[str]:
        return [r.error or str(r.status) for r in self.replies if r.status != 200]

    @property
    def expiries(self) -> int:
        """How many times the TTL ran out during the run (counted from the warming write)."""
        return int(self.duration // self.ttl)

    @property
    def versions(self) -> set[int]:
        return {int(r.product["version"]) for r in self.replies if r.product is not None}

    @property
    def refreshes_seen(self) -> int:
        """New values served during the run (versions other than the warmed one)."""
        return len(self.versions - {self.warm_version})

    @property
    def latencies(self) -> list[float]:
        return [r.latency for r in self.replies]

    @property
    def waited(self) -> list[float]:
        """Latencies of the requests that took the origin's delay or longer."""
        return [x for x in self.latencies if x >= self.origin_delay]

    @property
    def server_times(self) -> list[float]:
        """Seconds each request spent in the cache call, in its worker."""
        return [r.server for r in self.replies if r.server is not None]

    @property
    def server_waited(self) -> list[float]:
        """Cache calls that took the origin's delay or longer, in the worker."""
        return [x for x in self.server_times if x >= self.origin_delay]

    @property
    def pids(self) -> Counter[int]:
        return Counter(r.pid for r in self.replies if r.pid is not None)

    @property
    def origin_call_bound(self) -> int:
        """The most origin calls stampede may make in this run.

        The lease lets one load run at a time for all the workers, and a refresh
        starts no sooner than ``ttl * MIN_FRESH_SHARE`` after the value it
        replaces was written, itself at least the origin delay after its load
        began. So loads start at least ``gap = delay + ttl * MIN_FRESH_SHARE``
        apart; the first one in the run no sooner than ``warm_sent + gap``, and
        the last one no later than the last request reached a worker, at most
        ``end + the longest latency``. Hence at most ``1 + window // gap``
        (a few ms off the gap for Redis rounding expiries to milliseconds).
        """
        gap = self.origin_delay + self.ttl * MIN_FRESH_SHARE - 0.005
        window = self.end + max(self.latencies, default=0.0) - (self.warm_sent + gap)
        return 1 + max(0, int(window // gap))

    def row(self) -> list[str]:
        lat = self.latencies
        return [
            f"{self.clients}",
            f"{self.duration:g}",
            f"{self.ttl:g}",
            f"{self.expiries}",
            f"{self.requests:,}",
            f"{self.origin_calls}",
            f"{self.refreshes_seen}",
            f"{len(self.pids)}",
            ms(percentile(lat, 0.5)),
            ms(percentile(lat, 0.99)),
            ms(max(lat, default=0.0)),
            ms(max(self.server_times, default=0.0)),
            f"{len(self.waited)}",
        ]


HOT_HEADER = [
    "clients",
    "seconds",
    "TTL s",
    "expiries",
    "requests",
    "origin calls",
    "refreshes seen",
    "workers answering",
    "p50 ms",
    "p99 ms",
    "max ms",
    "max in cache ms",
    "waited for origin",
]


async def hot_key(
    service_url: str,
    origin_url: str,
    *,
    ttl: float,
    origin_delay: float,
    clients: int = 20,
    duration: float = 5.5,
    think: float = 0.005,
    product_id: str | None = None,
) -> HotKeyResult:
    """``clients`` loops reading one warm product for ``duration`` s, ``think`` s apart.

    ``ttl`` and ``origin_delay`` are the service's and the origin's (for the
    report: expiries, and which requests waited for the origin).
    """
    if not 1 <= clients <= MAX_CLIENTS:
        raise ValueError(f"1..{MAX_CLIENTS} clients, not {clients}")
    if not 0 < duration <= MAX_DURATION:
        raise ValueError(f"a run lasts 0..{MAX_DURATION} s, not {duration}")
    product_id = product_id or f"hot-{uuid.uuid4().hex[:12]}"
    path = f"/products/{product_id}"
    url = service_url + path
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(limits=limits, timeout=30.0) as client:
        warm_sent = time.monotonic()
        warm = await _get(client, url)  # the one request that waits: the key is cold
        if warm.status != 200 or warm.product is None:
            raise RuntimeError(f"warming {path} failed: {warm.status} {warm.error}")
        before = await origin_calls(client, origin_url, path)
        end = time.monotonic() + duration

        async def reader() -> list[Reply]:
            mine: list[Reply] = []
            while time.monotonic() < end:
                mine.append(await _get(client, url))
                await asyncio.sleep(think)  # the client's own work between requests
            return mine

        parts = await asyncio.gather(*(reader() for _ in range(clients)))
        after = await origin_calls(client, origin_url, path)
    replies = [r for part in parts for r in part]
    warm_version = int(warm.product["version"])
    return HotKeyResult(
        product_id,
        clients,
        duration,
        ttl,
        origin_delay,
        replies,
        after - before,
        warm_version,
        warm_sent,
        end,
    )


# -- reports -------------------------------------------------------------------------


def burst_report(
    cold: BurstResult, stats: Mapping[int, Mapping[str, Any]], warm: BurstResult | None = None
) -> str:
    """The burst table: the cold key, and the same burst again on the warm key if given."""
    rows = [cold.row("cold key")]
    if warm is not None:
        rows.append(warm.row("same key, warm"))
    lines = [
        f"## Burst: {cold.requests} concurrent requests for one cold product\n",
        markdown(BURST_HEADER, rows),
        "",
        f"Cold burst sent within {ms(cold.send_spread)} ms, each request on a new "
        f"connection; answered by workers {dict(sorted(cold.pids.items()))} (pid: requests).",
    ]
    if warm is not None:
        lines.append(
            "The warm row is the same burst once the product is cached (all hits): the "
            f"HTTP cost of {cold.requests} new connections at once on this machine, without any "
            "wait."
        )
    if stats:
        lines.append(
            f"Workers' counters: {total(stats, 'loads')} load, "
            f"{total(stats, 'lease_waits')} lease waits (workers that waited for another "
            f"worker's load), {total(stats, 'coalesced')} requests coalesced in-process."
        )
    return "\n".join(lines)


def hot_report(result: HotKeyResult, stats: Mapping[int, Mapping[str, Any]]) -> str:
    lines = [
        f"## Hot key: {result.clients} clients for {result.duration:g} s, TTL {result.ttl:g} s, "
        f"origin {ms(result.origin_delay)} ms\n",
        markdown(HOT_HEADER, [result.row()]),
        "",
        f"'waited for origin' counts requests that took {ms(result.origin_delay)} ms or more "
        f"(the client's clock; in the workers, the slowest cache call took "
        f"{ms(max(result.server_times, default=0.0))} ms). Origin calls allowed by the "
        f"refresh rule: at most {result.origin_call_bound}.",
    ]
    if stats:
        lines.append(
            f"Workers' counters: {total(stats, 'loads')} loads and {total(stats, 'misses')} "
            f"miss (the warm-up's included), {total(stats, 'lease_waits')} lease waits, "
            f"{total(stats, 'coalesced')} coalesced waits, "
            f"{total(stats, 'stale_served')} stale values served, "
            f"{total(stats, 'early_refreshes')} early refreshes counted."
        )
    return "\n".join(lines)


# -- the command line ----------------------------------------------------------------


async def _run(args: argparse.Namespace, out: TextIO) -> int:
    def progress(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    if not args.self_contained:
        async with httpx.AsyncClient(timeout=10.0) as client:
            delay = float((await origin_snapshot(client, args.origin))["delay_ms"]) / 1000
            response = await client.get(f"{args.service}/stats")
            response.raise_for_status()
            ttl = float(response.json()["cache"]["ttl"])
        if "burst" in args.scenario:
            progress(f"burst of {args.burst} against {args.service}")
            result = await burst(args.service, args.origin, args.burst)
            warm = await burst(args.service, args.origin, args.burst, result.product_id)
            print(burst_report(result, {}, warm), file=out)
        if "hot" in args.scenario:
            progress(f"hot key: {args.clients} clients, {args.duration:g} s (TTL {ttl:g} s)")
            hot = await hot_key(
                args.service,
                args.origin,
                ttl=ttl,
                origin_delay=delay,
                clients=args.clients,
                duration=args.duration,
                think=args.think_ms / 1000,
            )
            print("\n" + hot_report(hot, {}), file=out)
        return 0

    from tests.support.redis_server import RedisServer

    from .origin import OriginServer

    delay = args.delay_ms / 1000
    with RedisServer() as redis_server, OriginServer(delay) as origin:
        progress(
            f"private redis on {redis_server.url}; origin on {origin.url} ({args.delay_ms:g} ms)"
        )
        if "burst" in args.scenario:
            # A TTL far longer than the burst: the origin calls counted are the cold load's.
            with Service(redis_server.url, origin.url, args.workers, ttl=60.0) as service:
                pids = await service.wait_ready()
                progress(f"uvicorn up, {len(pids)} workers; burst of {args.burst}")
                result = await burst(service.url, origin.url, args.burst)
                stats = await worker_stats(service.url, args.workers)
                warm = await burst(service.url, origin.url, args.burst, result.product_id)
            print(burst_report(result, stats, warm), file=out)
        if "hot" in args.scenario:
            with Service(
                redis_server.url, origin.url, args.workers, ttl=args.ttl, stale_ttl=args.stale_ttl
            ) as service:
                pids = await service.wait_ready()
                progress(
                    f"uvicorn up, {len(pids)} workers; hot key: {args.clients} clients, "
                    f"{args.duration:g} s, TTL {args.ttl:g} s"
                )
                hot = await hot_key(
                    service.url,
                    origin.url,
                    ttl=args.ttl,
                    origin_delay=delay,
                    clients=args.clients,
                    duration=args.duration,
                    think=args.think_ms / 1000,
                )
                stats = await worker_stats(service.url, args.workers)
            print("\n" + hot_report(hot, stats), file=out)
    return 0


def main(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.service.loadtest",
        description="A cold-key burst and a hot key under load, against the example service.",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--service", metavar="URL", help="a running service, e.g. http://127.0.0.1:8000"
    )
    where.add_argument(
        "--self-contained",
        action="store_true",
        help="start a private redis-server, the origin and uvicorn here, then run",
    )
    parser.add_argument(
        "--origin", metavar="URL", default="http://127.0.0.1:8081", help="the running origin"
    )
    parser.add_argument("--scenario", choices=["burst", "hot", "both"], default="both")
    parser.add_argument("--burst", type=int, default=200, help="requests in the burst (200)")
    parser.add_argument("--clients", type=int, default=20, help="hot-key clients (20)")
    parser.add_argument("--duration", type=float, default=5.5, help="hot-key seconds (5.5)")
    parser.add_argument(
        "--think-ms", type=float, default=5.0, help="pause of a hot-key client between requests"
    )
    group = parser.add_argument_group("--self-contained only")
    group.add_argument("--workers", type=int, default=4, help="uvicorn workers (4)")
    group.add_argument("--delay-ms", type=float, default=500.0, help="origin delay (500)")
    group.add_argument("--ttl", type=float, default=1.0, help="hot-key service CACHE_TTL (1)")
    group.add_argument(
        "--stale-ttl", type=float, default=30.0, help="hot-key service CACHE_STALE_TTL (30)"
    )
    args = parser.parse_args(argv)
    if args.scenario == "both":
        args.scenario = "burst hot"
    if not 1 <= args.burst <= MAX_BURST:
        parser.error(f"--burst must be 1..{MAX_BURST}")
    if not 1 <= args.clients <= MAX_CLIENTS:
        parser.error(f"--clients must be 1..{MAX_CLIENTS}")
    if not 0 < args.duration <= MAX_DURATION:
        parser.error(f"--duration must be in (0, {MAX_DURATION:g}]")
    if not 1 <= args.workers <= 16 or args.ttl <= 0 or args.delay_ms < 0 or args.think_ms < 0:
        parser.error("--workers must be 1..16, --ttl > 0, --delay-ms and --think-ms >= 0")
    return asyncio.run(_run(args, out))


if __name__ == "__main__":
    raise SystemExit(main())
