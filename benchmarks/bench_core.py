#!/usr/bin/env python
"""Core benchmarks of stampede against its peers, side by side, in one process run.

Sections (DESIGN.md section 4):

1. hit cost, sync: ns per memory hit of one key, ratio to
   ``cachetools.cached(TTLCache, condition=...)`` (``_hit.py``);
2. hit cost, async: ns per awaited memory hit, ratio to aiocache's ``cached``;
3. cold key, threads: N threads behind a barrier ask for one missing key whose
   loader sleeps 50 ms: loader calls and caller latency beyond the loader
   (``_cold.py``);
4. cold key, asyncio: the same with N tasks and an ``asyncio.sleep`` loader;
5. hot key expiring under load: TTL 1 s, 100 ms loader, 20 workers reading one
   key for 5 s: loader calls, reads that waited for a load, latency (``_hot.py``);
6. shared-store hits: ns per hit of one key in Redis (a private ``redis-server``
   started for the run) and in a diskcache ``Cache``, ratio to a raw redis-py
   ``GET`` + ``pickle.loads``, and Redis commands per hit (``_shared_hits.py``);
7. cold key across processes: 4 processes x 25 callers on one missing key in a
   private Redis, 100 ms loader: loader calls, caller latency beyond the loader,
   Redis commands per process per flight (``_fleet.py``);
8. hot key across processes: 4 processes x 10 threads read one key in a private
   Redis for 5 s, TTL 1 s, 100 ms loader: refreshes per expiry (loader calls
   per renewal of the value), reads that waited for a load, Redis commands per
   process per second (``_refresh.py``).

Prints markdown tables and a final "targets" table (PASS/MISS). Timing never
fails the run: the exit status is 0 whatever the numbers. Peers that are not
installed show as "n/a (not installed: ...)".

    python benchmarks/bench_core.py [--quick] [--think-ms MS]
        [--only hit|cold|hot|shared|fleet|refresh]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# Measure the checkout this script lives in, not another installed copy; the
# section modules live next to this file.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cold import (
    COLD_NOTE,
    FLOOR_TASKS,
    FLOOR_THREADS,
    LOADER_S,
    STAMPEDE_TASKS,
    STAMPEDE_THREADS,
    bench_cold_tasks,
    bench_cold_threads,
    cold_targets,
    report_cold,
)
from _common import Config, Target, find, table
from _fleet import bench_fleet, fleet_note, fleet_targets, report_fleet
from _hit import bench_hit_async, bench_hit_sync, hit_targets, report_hit_async, report_hit_sync
from _hot import HOT_LOADER_S, HOT_TTL, bench_hot, hot_note, hot_targets, report_hot
from _invalidation import GAP_S, INVALIDATION_NOTE, bench_invalidation, report_invalidation
from _refresh import (
    bench_refresh,
    near_targets,
    refresh_note,
    refresh_targets,
    refresh_title,
    report_refresh,
)
from _shared_hits import (
    ASYNC_DATA,
    ASYNC_FLOOR,
    REDIS_DATA,
    REDIS_FLOOR,
    bench_shared,
    report_disk,
    report_redis,
    shared_note,
    shared_targets,
)

import stampede

PEERS = (
    "cachetools",
    "cachebox",
    "dogpile.cache",
    "aiocache",
    "cashews",
    "diskcache",
    "redis",
    "hiredis",
)


def machine() -> str:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    rows = [
        ["python", f"{platform.python_implementation()} {platform.python_version()}"],
        ["cpus", f"{os.cpu_count()} (usable: {usable})"],
        ["platform", platform.platform()],
        ["stampede", f"{stampede.__version__} ({Path(stampede.__file__).parent})"],
    ]
    for name in PEERS:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        rows.append([name, version])
    return table(["", ""], rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts (CI smoke run)")
    parser.add_argument(
        "--only",
        choices=("hit", "cold", "hot", "shared", "fleet", "refresh", "invalidation"),
        help="run one part only",
    )
    parser.add_argument(
        "--think-ms",
        type=float,
        default=1.0,
        help="hot key (sections 5, 8): sleep between two reads, in ms (default 1; 0: none)",
    )
    args = parser.parse_args(argv)
    cfg = Config.make(args.quick, think_s=args.think_ms / 1e3)
    began = time.perf_counter()

    def emit(text: str) -> None:
        print(text, flush=True)

    mode = "quick" if cfg.quick else "full"
    emit(f"# stampede core benchmarks ({mode} run)\n")
    emit(machine() + "\n")
    targets: list[Target] = []

    if args.only in (None, "hit"):
        sync = bench_hit_sync(cfg)
        emit("## 1. Memory hit, sync (one key, already cached)\n")
        emit(report_hit_sync(sync) + "\n")
        emit(
            f"Each row: the minimum of {cfg.rounds} rounds of ~{cfg.repeat_s:g} s; rounds "
            "interleave the rows. Includes the loop's own overhead (see the plain call row).\n"
        )
        asyn = bench_hit_async(cfg)
        emit("## 2. Memory hit, async (awaited in a loop inside one coroutine)\n")
        emit(report_hit_async(asyn) + "\n")
        targets += hit_targets(sync, asyn)

    if args.only in (None, "cold"):
        callers = f"{cfg.threads:,} threads"
        threads = bench_cold_threads(cfg)
        emit(f"## 3. Cold key, {callers}, {LOADER_S * 1e3:g} ms `time.sleep` loader\n")
        emit(report_cold(threads, callers) + "\n")
        emit(COLD_NOTE.format(trials=cfg.thread_trials, loader=LOADER_S * 1e3) + "\n")
        targets += cold_targets(
            find(threads, STAMPEDE_THREADS), find(threads, FLOOR_THREADS), callers
        )

        callers = f"{cfg.tasks:,} tasks"
        tasks = bench_cold_tasks(cfg)
        emit(f"## 4. Cold key, {callers}, {LOADER_S * 1e3:g} ms `asyncio.sleep` loader\n")
        emit(report_cold(tasks, callers) + "\n")
        emit(
            COLD_NOTE.format(trials=cfg.task_trials, loader=LOADER_S * 1e3)
            + f" The trials of one variant are capped at {cfg.cap_s:g} s in all.\n"
        )
        targets += cold_targets(find(tasks, STAMPEDE_TASKS), find(tasks, FLOOR_TASKS), callers)

    if args.only in (None, "hot"):
        hot = bench_hot(cfg)
        emit(
            f"## 5. Hot key expiring under load: TTL {HOT_TTL:g} s, "
            f"{HOT_LOADER_S * 1e3:g} ms loader, {cfg.hot_workers} workers, {cfg.hot_s:g} s\n"
        )
        emit(report_hot(hot) + "\n")
        emit(hot_note(cfg) + "\n")
        targets += hot_targets(hot, cfg)

    if args.only in (None, "shared"):
        shared = bench_shared(cfg)
        emit("## 6. Shared-store hits (one key, already cached)\n")
        if shared.redis_na:
            emit(f"### Redis\n\nNo Redis rows: {shared.redis_na}\n")
        else:
            emit("### Redis, sync\n")
            emit(report_redis(shared.sync, REDIS_FLOOR, REDIS_DATA) + "\n")
            emit("### Redis, async (awaited in a loop inside one coroutine)\n")
            emit(report_redis(shared.asyn, ASYNC_FLOOR, ASYNC_DATA) + "\n")
        emit("### diskcache (a `Cache` in a temporary directory)\n")
        emit(report_disk(shared.disk) + "\n")
        emit(shared_note(cfg, shared) + "\n")
        targets += shared_targets(shared)

    if args.only in (None, "fleet"):
        fleet = bench_fleet(cfg)
        emit("## 7. Cold key across processes (Redis): 4 processes x 25 callers, 100 ms loader\n")
        emit(report_fleet(fleet) + "\n")
        emit(fleet_note(fleet) + "\n")
        targets += fleet_targets(fleet)

    if args.only in (None, "refresh"):
        refresh = bench_refresh(cfg)
        emit(f"## 8. {refresh_title(refresh)}\n")
        emit(report_refresh(refresh) + "\n")
        emit(refresh_note(refresh) + "\n")
        targets += refresh_targets(refresh)
        targets += near_targets(refresh)

    if args.only in (None, "invalidation"):
        delivery = bench_invalidation(cfg)
        emit("## 9. Invalidation delivery to other processes' near caches (Redis)\n")
        emit(report_invalidation(delivery) + "\n")
        emit(
            INVALIDATION_NOTE.format(
                writes=delivery.writes, gap=GAP_S * 1e3, readers=delivery.readers
            )
            + "\n"
        )

    emit("## Targets (DESIGN.md section 4)\n")
    emit(table(["what", "target", "measured", "verdict"], [t.row() for t in targets]) + "\n")
    emit(f"Total run time: {time.perf_counter() - began:.1f} s.")
    return 0  # timing never fails the run


if __name__ == "__main__":
    sys.exit(main())
