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
import statistics
import sys
import threading
import time
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


Strategy = Callable[[Origin, float], Callable[[str], str]]


def no_cache(origin: Origin, ttl: float) -> Callable[[str], str]:
    return origin.fetch


def ttl_cache(origin: Origin, ttl: float) -> Callable[[str], str]:
    @cachetools.cached(cachetools.TTLCache(maxsize=1024, ttl=ttl), lock=threading.Lock())
    def get(key: str) -> str:
        return origin.fetch(key)

    return get


def with_stampede(origin: Origin, ttl: float) -> Callable[[str], str]:
    @cached(ttl=ttl, beta=1.0)
    def get(key: str) -> str:
        return origin.fetch(key)

    return get


STRATEGIES: dict[str, Strategy] = {
    "no cache": no_cache,
    "TTL cache (cachetools)": ttl_cache,
    "stampede": with_stampede,
}


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


def run_burst(make: Strategy, name: str, callers: int, latency: float, ttl: float) -> Result:
    origin = Origin(latency)
    get = make(origin, ttl)
    barrier = threading.Barrier(callers)
    latencies: list[float] = []
    lock = threading.Lock()

    def caller() -> None:
        barrier.wait()
        t0 = time.perf_counter()
        get("cold-key")
        spent = time.perf_counter() - t0
        with lock:
            latencies.append(spent)

    threads = [threading.Thread(target=caller, daemon=True) for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    waited = sum(1 for x in latencies if x >= latency / 2)
    return Result("burst", name, len(origin.calls), callers, latencies, waited, origin.calls)


def run_hot_key(
    make: Strategy, name: str, workers: int, duration: float, latency: float, ttl: float
) -> Result:
    origin = Origin(latency)
    get = make(origin, ttl)
    get("hot-key")  # warm: the question is what happens at each expiry
    origin.calls.clear()
    origin.started = time.monotonic()
    stop = time.monotonic() + duration
    latencies: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        mine: list[float] = []
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            get("hot-key")
            mine.append(time.perf_counter() - t0)
            time.sleep(0.002)  # a request's own work between cache reads
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 60)
    waited = sum(1 for x in latencies if x >= latency / 2)
    return Result(
        "hot key", name, len(origin.calls), len(latencies), latencies, waited, origin.calls
    )


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
    args = parser.parse_args(argv)
    callers = args.callers or (100 if args.quick else 200)
    workers = args.workers or (10 if args.quick else 20)
    duration = args.duration or (1.5 if args.quick else 5.0)
    latency = args.origin_ms / 1000
    if min(callers, workers) < 1 or duration <= 0 or args.ttl <= 0 or latency < 0:
        parser.error("counts, --duration and --ttl must be positive")

    if args.plot:
        _pyplot()  # fail before the runs, not after them

    def progress(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    progress(
        f"origin latency {latency * 1000:.0f} ms, TTL {args.ttl:g} s; "
        f"burst of {callers} callers; hot key: {workers} workers for {duration:g} s each"
    )
    burst: list[Result] = []
    hot: list[Result] = []
    steps = 2 * len(STRATEGIES)
    step = 0
    for name, make in STRATEGIES.items():
        step += 1
        progress(f"[{step}/{steps}] burst    · {name}")
        burst.append(run_burst(make, name, callers, latency, args.ttl))
    for name, make in STRATEGIES.items():
        step += 1
        progress(f"[{step}/{steps}] hot key  · {name} ({duration:g} s)")
        hot.append(run_hot_key(make, name, workers, duration, latency, args.ttl))

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
