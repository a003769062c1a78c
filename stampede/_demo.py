"""``python -m stampede demo``: a stampede, with and without protection.

Two scenarios against a slow fake origin, each run for three strategies:

- burst: many callers ask for one missing key at the same instant;
- hot key: workers keep asking for one key while it expires again and again.

Strategies: no cache at all; a plain TTL cache (cachetools' ``cached`` with a
lock, the usual recipe: the lock guards the dict, not the load); stampede's
``@cached`` (single-flight plus XFetch early refresh). The tables show how
often the origin was called and how long callers took.

The text under the tables is computed from the numbers of the run
(``burst_note``, ``summary``: pure functions of the results), so it claims
only what the run showed: a demo on a loaded machine or a failing store must
not print a canned victory. A ``--backend`` is checked before any scenario
runs (``preflight``): a store that cannot be reached would make every run
fail open, and the tables would compare nothing.
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import cachetools

from ._decorator import cached


@dataclass
class Origin:
    """A slow origin (a database, an API) that counts its calls."""

    latency: float
    started: float = field(default_factory=time.monotonic)
    calls: list[float] = field(default_factory=list)  # call times, from `started`
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def fetch(self, key: str) -> str:
        with self._lock:
            self.calls.append(time.monotonic() - self.started)
        time.sleep(self.latency)
        return f"value of {key}"


@dataclass(frozen=True)
class Setup:
    """Where stampede keeps entries, and how many processes share them."""

    backend: str | None = None  # a URL (redis://, disk:///...) or None: in-process memory
    processes: int = 1
    namespace: str = "demo"


Strategy = Callable[[Origin, float, Setup], Callable[[str], str]]

NO_CACHE = "no cache"
TTL_CACHE = "TTL cache (cachetools)"


def no_cache(origin: Origin, ttl: float, setup: Setup) -> Callable[[str], str]:
    return origin.fetch


def ttl_cache(origin: Origin, ttl: float, setup: Setup) -> Callable[[str], str]:
    @cachetools.cached(cachetools.TTLCache(maxsize=1024, ttl=ttl), lock=threading.Lock())
    def get(key: str) -> str:
        return origin.fetch(key)

    return get


def _stampede(distributed: bool) -> Strategy:
    def make(origin: Origin, ttl: float, setup: Setup) -> Callable[[str], str]:
        @cached(
            cache=setup.backend,
            ttl=ttl,
            beta=1.0,
            namespace=setup.namespace,
            distributed=distributed,
        )
        def get(key: str) -> str:
            return origin.fetch(key)

        return get

    return make


def strategies(setup: Setup) -> dict[str, Strategy]:
    found: dict[str, Strategy] = {NO_CACHE: no_cache, TTL_CACHE: ttl_cache}
    if setup.backend and setup.processes > 1:
        found["stampede, per process"] = _stampede(False)
        found["stampede, distributed"] = _stampede(True)
    else:
        found["stampede"] = _stampede(False)
    return found


STRATEGIES = strategies(Setup())


@dataclass
class Result:
    scenario: str
    strategy: str
    origin_calls: int
    requests: int
    latencies: list[float]
    waited: int  # requests that took at least half the origin's latency
    call_times: list[float]

    def p99(self) -> float:
        """The 99th percentile latency in seconds (0 with no requests)."""
        lat = sorted(self.latencies)
        return lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else 0.0

    def row(self) -> list[str]:
        lat = sorted(self.latencies)
        return [
            self.strategy,
            f"{self.requests:,}",
            f"{self.origin_calls:,}",
            f"{self.waited:,}",
            f"{statistics.median(lat) * 1000:.1f}" if lat else "-",
            f"{self.p99() * 1000:.1f}",
            f"{lat[-1] * 1000:.1f}" if lat else "-",
        ]


@dataclass(frozen=True)
class Scenario:
    kind: str  # "burst" or "hot key"
    strategy: str
    threads: int  # callers (burst) or workers (hot key), in this process
    latency: float
    ttl: float
    duration: float = 0.0


Measured = tuple[int, list[float], list[float]]  # origin calls, latencies, call times


def measure(
    scenario: Scenario, setup: Setup, start: Callable[[], object] = lambda: None
) -> Measured:
    """Run ``scenario`` with threads of this process; ``start`` lines processes up."""
    origin = Origin(scenario.latency)
    get = strategies(setup)[scenario.strategy](origin, scenario.ttl, setup)
    key = f"{scenario.kind}-{scenario.strategy}"
    if scenario.kind == "hot key":
        get(key)  # warm: the question is what happens at each expiry
    start()
    origin.calls.clear()
    origin.started = time.monotonic()
    stop = time.monotonic() + scenario.duration
    barrier = threading.Barrier(scenario.threads)
    latencies: list[float] = []
    lock = threading.Lock()

    def caller() -> None:
        mine: list[float] = []
        barrier.wait()
        while True:
            t0 = time.perf_counter()
            get(key)
            mine.append(time.perf_counter() - t0)
            if scenario.kind == "burst" or time.monotonic() >= stop:
                break
            time.sleep(0.002)  # a request's own work between cache reads
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=caller, daemon=True) for _ in range(scenario.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(scenario.duration + 60)
    return len(origin.calls), latencies, list(origin.calls)


def _child(queue: Any, barrier: Any, scenario: Scenario, setup: Setup) -> None:
    queue.put(measure(scenario, setup, barrier.wait))


def run(scenario: Scenario, setup: Setup) -> Result:
    """``scenario`` in this process, or split over ``setup.processes`` processes."""
    if setup.processes <= 1:
        parts = [measure(scenario, setup)]
    else:
        ctx = multiprocessing.get_context("spawn")
        queue, barrier = ctx.Queue(), ctx.Barrier(setup.processes)
        share = Scenario(
            scenario.kind,
            scenario.strategy,
            max(1, scenario.threads // setup.processes),
            scenario.latency,
            scenario.ttl,
            scenario.duration,
        )
        procs = [
            ctx.Process(target=_child, args=(queue, barrier, share, setup), daemon=True)
            for _ in range(setup.processes)
        ]
        for proc in procs:
            proc.start()
        parts = [queue.get(timeout=scenario.duration + 120) for _ in procs]
        for proc in procs:
            proc.join(30)
    calls = sum(p[0] for p in parts)
    latencies = [x for p in parts for x in p[1]]
    times = [x for p in parts for x in p[2]]
    waited = sum(1 for x in latencies if x >= scenario.latency / 2)
    return Result(scenario.kind, scenario.strategy, calls, len(latencies), latencies, waited, times)


HEADER = ["strategy", "requests", "origin calls", "waited for origin", "p50 ms", "p99 ms", "max ms"]


def table(results: list[Result]) -> str:
    rows = [HEADER, *(r.row() for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def plural(n: int, one: str, many: str = "") -> str:
    """``n`` and the noun that goes with it: "1 process", "4 processes"."""
    return f"{n:,} {one if n == 1 else many or one + 's'}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _ours(results: list[Result]) -> list[Result]:
    return [r for r in results if r.strategy.startswith("stampede")]


def _listed(results: list[Result], number: Callable[[Result], int]) -> str:
    return "; ".join(f"{r.strategy} {number(r):,}" for r in results)


def burst_note(burst: list[Result], cores: int | None) -> str | None:
    """Why stampede's p99 is above no cache's in ``burst``, when it is (else None)."""
    base = {r.strategy: r for r in burst}.get(NO_CACHE)
    if base is None:
        return None
    slower = [r for r in _ours(burst) if r.p99() > base.p99()]
    if not slower:
        return None
    on = plural(cores, "CPU core") if cores else "this machine's CPU cores"
    rows = "; ".join(f"{r.strategy} {_ms(r.p99())} ms" for r in slower)
    saved = ", ".join(f"{plural(r.origin_calls, 'call')} ({r.strategy})" for r in slower)
    return (
        f"Why is stampede's p99 above no cache's ({_ms(base.p99())} ms) here? {rows}. The callers "
        f"that coalesce all wait for one load and are woken together when it ends; on {on} "
        f"they resume a few at a time, so the last of them finish later than callers that "
        f"each slept through their own origin call (this fake origin takes as long however "
        f"many call it at once). What the cache saves is the origin's work: {saved} instead "
        f"of {base.origin_calls:,}."
    )


def _burst_summary(burst: list[Result], processes: int) -> list[str]:
    by_name = {r.strategy: r for r in burst}
    base, plain = by_name.get(NO_CACHE), by_name.get(TTL_CACHE)
    callers = max((r.requests for r in burst), default=0)
    said = [
        f"Burst: {plural(callers, 'caller')} missed one key at once. Origin calls: "
        f"{_listed(burst, lambda r: r.origin_calls)}."
    ]
    for r in _ours(burst):
        if base is not None and r.origin_calls >= base.origin_calls:
            said.append(
                f"{r.strategy} saved no origin calls in this burst ({r.origin_calls:,}, "
                f"against {base.origin_calls:,} with no cache)."
            )
        elif r.origin_calls == 1 and r.requests > 1:
            said.append(f"{r.strategy} made one origin call for all {r.requests:,} callers.")
        else:
            said.append(
                f"{r.strategy} made {plural(r.origin_calls, 'origin call')} for "
                f"{plural(r.requests, 'caller')}."
            )
    if plain is not None and plain.requests > 1 and plain.origin_calls == plain.requests:
        said.append(
            "The TTL cache let every caller call the origin: its lock guards its dict, "
            "not the load."
        )
    said += _across(by_name, processes, "in the burst")
    return said


def _across(by_name: dict[str, Result], processes: int, where: str) -> list[str]:
    """What the fleet's lease saved over coalescing in each process, if both ran."""
    fleet, each = by_name.get("stampede, distributed"), by_name.get("stampede, per process")
    if fleet is None or each is None:
        return []
    if fleet.origin_calls < each.origin_calls:
        return [
            f"Across {plural(processes, 'process', 'processes')}, the lease in the store saved "
            f"{plural(each.origin_calls - fleet.origin_calls, 'origin call')} {where} "
            f"({fleet.origin_calls:,} distributed, {each.origin_calls:,} per process)."
        ]
    return [
        f"The lease in the store saved no origin calls {where} over coalescing in each "
        f"process ({fleet.origin_calls:,} distributed, {each.origin_calls:,} per process)."
    ]


def _hot_summary(hot: list[Result], expiries: int, processes: int) -> list[str]:
    by_name = {r.strategy: r for r in hot}
    plain = by_name.get(TTL_CACHE)
    if expiries == 0:
        expires = "does not expire during the run"
    else:
        expires = "expires about " + ("once" if expiries == 1 else f"{expiries:,} times")
    said = [
        f"Hot key: the key {expires}. Origin calls: "
        f"{_listed(hot, lambda r: r.origin_calls)}. Requests that waited for the origin: "
        f"{_listed(hot, lambda r: r.waited)}."
    ]
    for r in _ours(hot):
        if plain is None:
            continue
        name, waited, theirs = r.strategy, r.waited, plain.waited
        if waited == 0 and theirs == 0:
            said.append(f"No request waited for the origin with {name} or the TTL cache.")
        elif waited == 0 and r.origin_calls > 0:
            said.append(
                f"{name} refreshed the key in the background before it expired (XFetch): "
                f"no request waited for the origin, against {theirs:,} with the TTL cache."
            )
        elif waited == 0:
            said.append(f"No request waited with {name}, against {theirs:,} with the TTL cache.")
        elif waited < theirs:
            said.append(
                f"{name} made fewer requests wait for the origin than the TTL cache "
                f"({waited:,} against {theirs:,}), but not none (on a busy machine an early "
                f"refresh can start too late)."
            )
        else:
            said.append(
                f"{name} did not spare requests the wait at expiry in this run: "
                f"{waited:,} waited, against {theirs:,} with the TTL cache."
            )
        ours, other = r.origin_calls, plain.origin_calls
        if ours < other:
            said.append(
                f"It called the origin {plural(ours, 'time')}, the TTL cache "
                f"{plural(other, 'time')}."
            )
        elif ours > other:
            said.append(
                f"It called the origin more often than the TTL cache ({ours:,} against "
                f"{other:,}): refreshing early takes the calls out of the readers' way, it "
                f"does not remove them."
            )
        else:
            said.append(f"It called the origin as often as the TTL cache ({ours:,}).")
    said += _across(by_name, processes, "on the hot key")
    return said


def summary(
    burst: list[Result],
    hot: list[Result],
    *,
    expiries: int,
    latency: float,
    processes: int = 1,
) -> str:
    """The closing text: what the numbers of this run show, and nothing they do not."""
    paragraphs = [
        _burst_summary(burst, processes),
        _hot_summary(hot, expiries, processes),
        [
            f"'waited for origin' counts requests that took at least half the origin "
            f"latency ({_ms(latency / 2)} ms)."
        ],
    ]
    return "\n\n".join(" ".join(p) for p in paragraphs)


def _shown(url: str) -> str:
    """``url`` with any password hidden, fit to print."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def preflight(url: str) -> str | None:
    """Why the demo cannot use the store at ``url``, or None when it answers.

    Made the way the demo's caches make it (the same client, its 1 s timeouts):
    a Redis server must answer a PING, a disk folder must open. Checked before
    any scenario runs: a store that fails would make every run "fail open"
    (load without the store) and the tables would compare nothing.
    """
    from .backends import resolve

    shown = _shown(url)
    try:
        store: Any = resolve(url)
    except ImportError as exc:
        return f"cannot use {shown}: {_reason(exc)}."
    except Exception as exc:  # a bad URL, a folder that cannot be made or opened
        advice = ""
        if url.startswith("disk:"):
            advice = " Pass a folder this user can create, e.g. disk:///tmp/stampede-demo."
        return f"cannot use {shown} as the demo's store: {_reason(exc)}.{advice}"
    try:
        if url.startswith("disk:"):
            store.cache.close()
            return None
        client = store.client
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        port = urlsplit(url).port or 6379
        return (
            f"cannot reach Redis at {shown}: {_reason(exc)}. Start a Redis server there (a "
            f"throwaway one: redis-server --port {port} --save '', or docker run --rm "
            f"-p {port}:6379 redis) or pass another --backend; without --backend the demo "
            f"runs in this process's memory."
        )
    return None


def _reason(exc: BaseException) -> str:
    return str(exc).rstrip(".") or type(exc).__name__


def _pyplot() -> Any:
    try:
        matplotlib = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        return importlib.import_module("matplotlib.pyplot")
    except ImportError:
        raise SystemExit(
            "--plot needs matplotlib: pip install 'stampede[plot]' (or matplotlib)"
        ) from None


def plot(results: list[Result], path: str, duration: float) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for r in results:
        times = sorted(r.call_times)
        ax.step(times, range(1, len(times) + 1), where="post", label=r.strategy)
    ax.set_xlim(0, duration)
    ax.set_xlabel("seconds")
    ax.set_ylabel("origin calls so far")
    ax.set_yscale("symlog")
    ax.set_title("Hot key expiring under load: origin calls over time")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stampede demo",
        description=(
            "Simulate a cache stampede against a slow fake origin, for three strategies: "
            "no cache, a plain TTL cache (cachetools) and stampede."
        ),
    )
    parser.add_argument("--quick", action="store_true", help="a short run (a few seconds)")
    parser.add_argument("--callers", type=int, help="callers in the cold-key burst (default 200)")
    parser.add_argument("--workers", type=int, help="workers reading the hot key (default 20)")
    parser.add_argument(
        "--duration", type=float, help="seconds of the hot-key scenario (default 5)"
    )
    parser.add_argument("--ttl", type=float, default=1.0, help="cache TTL in seconds (default 1)")
    parser.add_argument(
        "--origin-ms", type=float, default=100.0, help="origin latency in ms (default 100)"
    )
    parser.add_argument("--plot", metavar="PNG", help="draw origin calls over time (matplotlib)")
    parser.add_argument(
        "--backend",
        metavar="URL",
        help="where stampede keeps entries: redis://host:port/db or disk:///path "
        "(default: this process's memory)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="split callers and workers over this many processes (default 1); with a "
        "shared --backend, stampede runs per process and distributed",
    )
    args = parser.parse_args(argv)
    callers = args.callers or (100 if args.quick else 200)
    workers = args.workers or (10 if args.quick else 20)
    duration = args.duration or (1.5 if args.quick else 5.0)
    latency = args.origin_ms / 1000
    if min(callers, workers, args.processes) < 1 or duration <= 0 or args.ttl <= 0 or latency < 0:
        parser.error("counts, --duration, --ttl and --processes must be positive")
    if args.backend and args.backend.startswith("memory:"):
        args.backend = None
    if args.backend:
        problem = preflight(args.backend)
        if problem is not None:
            print(f"python -m stampede demo: {problem}", file=sys.stderr)
            return 1
    setup = Setup(args.backend, args.processes, f"demo-{uuid.uuid4().hex[:8]}")
    chosen = strategies(setup)

    if args.plot:
        _pyplot()  # fail before the runs, not after them

    def progress(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    progress(
        f"origin latency {latency * 1000:.0f} ms, TTL {args.ttl:g} s; "
        f"burst of {plural(callers, 'caller')}; hot key: {plural(workers, 'worker')} for "
        f"{duration:g} s each; {plural(args.processes, 'process', 'processes')}; "
        f"stampede on {_shown(args.backend) if args.backend else 'memory'}"
    )
    burst: list[Result] = []
    hot: list[Result] = []
    steps = 2 * len(chosen)
    step = 0
    for name in chosen:
        step += 1
        progress(f"[{step}/{steps}] burst    · {name}")
        burst.append(run(Scenario("burst", name, callers, latency, args.ttl), setup))
    for name in chosen:
        step += 1
        progress(f"[{step}/{steps}] hot key  · {name} ({duration:g} s)")
        scenario = Scenario("hot key", name, workers, latency, args.ttl, duration)
        hot.append(run(scenario, setup))

    ask = "asks" if callers == 1 else "ask"
    print(f"\n## Burst: {plural(callers, 'caller')} {ask} for one missing key at once\n", file=out)
    print(table(burst), file=out)
    note = burst_note(burst, os.cpu_count())
    if note is not None:
        print(f"\n{note}", file=out)
    print(
        f"\n## Hot key: {plural(workers, 'worker')}, TTL {args.ttl:g} s, {duration:g} s\n",
        file=out,
    )
    print(table(hot), file=out)
    expiries = int(duration / args.ttl)
    closing = summary(burst, hot, expiries=expiries, latency=latency, processes=args.processes)
    print(f"\n## What this run shows\n\n{closing}", file=out)
    if args.plot:
        plot(hot, args.plot, duration)
        progress(f"plot written to {args.plot}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m stampede demo [options]   (see: python -m stampede demo --help)")
        return 0 if args else 2
    if args[0] != "demo":
        print(f"unknown command {args[0]!r}; try: python -m stampede demo --help", file=sys.stderr)
        return 2
    return main(args[1:])
