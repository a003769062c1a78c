"""``python -m stampede demo``: a stampede, with and without protection.

Two scenarios against a slow fake origin, each run for three strategies:

- burst: many callers ask for one missing key at the same instant;
- hot key: workers keep asking for one key while it expires again and again.

Strategies: no cache at all; a plain TTL cache (cachetools' ``cached`` with a
lock, the usual recipe: the lock guards the dict, not the load); stampede's
``@cached`` (single-flight plus XFetch early refresh). The tables show how
often the origin was called and how long callers took.
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

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
    found: dict[str, Strategy] = {"no cache": no_cache, "TTL cache (cachetools)": ttl_cache}
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

    def row(self) -> list[str]:
        lat = sorted(self.latencies)

        def p(q: float) -> float:
            return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else 0.0

        return [
            self.strategy,
            f"{self.requests:,}",
            f"{self.origin_calls:,}",
            f"{self.waited:,}",
            f"{statistics.median(lat) * 1000:.1f}" if lat else "-",
            f"{p(0.99) * 1000:.1f}",
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
    setup = Setup(args.backend, args.processes, f"demo-{uuid.uuid4().hex[:8]}")
    chosen = strategies(setup)

    if args.plot:
        _pyplot()  # fail before the runs, not after them

    def progress(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    progress(
        f"origin latency {latency * 1000:.0f} ms, TTL {args.ttl:g} s; "
        f"burst of {callers} callers; hot key: {workers} workers for {duration:g} s each; "
        f"{args.processes} process(es); stampede on {args.backend or 'memory'}"
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

    print(f"\n## Burst: {callers} callers ask for one missing key at once\n", file=out)
    print(table(burst), file=out)
    print(f"\n## Hot key: {workers} workers, TTL {args.ttl:g} s, {duration:g} s\n", file=out)
    print(table(hot), file=out)
    expiries = int(duration / args.ttl)
    times = "once" if expiries == 1 else f"{expiries} times"
    print(
        f"\nThe key expires about {times} during the hot-key run. 'waited for origin' "
        f"counts requests that took at least half the origin latency: stampede refreshes the "
        f"key in the background before it expires (XFetch), so nobody waits.",
        file=out,
    )
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
