"""Prometheus multiprocess mode: hits counted by worker processes reach the sums.

Real processes: workers started with ``multiprocessing`` (spawn, as uvicorn
does; fork after the parent watched its caches, as gunicorn ``--preload``
does) write their values under ``PROMETHEUS_MULTIPROC_DIR``; the test reads
them the way a ``/metrics`` endpoint does, with a ``MultiProcessCollector``.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

import stampede
from stampede.testing import wait_until

ROOT = Path(__file__).resolve().parent.parent


def summed(folder: Path) -> CollectorRegistry:
    """What a /metrics endpoint of the fleet serves: every worker's files, summed."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(folder))
    return registry


def value(registry: CollectorRegistry, name: str, cache: str) -> float:
    found = registry.get_sample_value(name, {"cache": cache})
    return 0.0 if found is None else found


# -- the workers (run in the spawned processes) ----------------------------------------


def _hits(hits: int, near: int, folder: str) -> None:
    """``hits`` memory hits on cache "users" (sync) and "rates" (async), and ``near``
    near hits on a disk cache "disk" with a near tier, each after one miss."""
    from stampede.metrics.prometheus import PrometheusMetrics

    metrics = PrometheusMetrics()
    users = metrics.watch(stampede.CoalescingCache(ttl=60, name="users", metrics=metrics))
    for _ in range(hits + 1):
        assert users.get_or_load("k", lambda: 1) == 1
    rates = metrics.watch(stampede.AsyncCoalescingCache(ttl=60, name="rates", metrics=metrics))

    async def read() -> None:
        for _ in range(hits + 1):
            assert await rates.get_or_load("k", lambda: 2) == 2

    asyncio.run(read())
    disk = metrics.watch(
        stampede.CoalescingCache(
            f"disk://{folder}", ttl=60, near_maxsize=10, near_ttl=60, name="disk", metrics=metrics
        )
    )
    disk.get_or_load("k", lambda: 3)  # a miss: loaded and stored
    disk.get_or_load("k", lambda: 3)  # a hit read from the disk: its near copy is made
    for _ in range(near):
        disk.get_or_load("k", lambda: 3)
    assert disk.stats().near_hits == near


def count_and_exit(hits: int, near: int, folder: str) -> None:
    _hits(hits, near, folder)  # the process then ends normally: never scraped


def count_and_stay(hits: int, near: int, folder: str, done: Any, release: Any) -> None:
    _hits(hits, near, folder)
    done.set()
    assert release.wait(60), "the test never released this worker"


def expected(plan: list[tuple[int, int]]) -> dict[tuple[str, str], float]:
    hits = sum(h for h, _ in plan)
    near = sum(n for _, n in plan)
    workers = len(plan)
    return {
        ("stampede_hits_total", "users"): hits,
        ("stampede_hits_total", "rates"): hits,
        ("stampede_hits_total", "disk"): near + workers,  # + the disk read of each
        ("stampede_near_hits_total", "disk"): near,
        ("stampede_misses_total", "users"): workers,
        ("stampede_loads_total", "rates"): workers,
    }


def seen(folder: Path, wanted: dict[tuple[str, str], float]) -> dict[tuple[str, str], float]:
    registry = summed(folder)
    return {(name, cache): value(registry, name, cache) for name, cache in wanted}


@pytest.fixture
def multiproc_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty PROMETHEUS_MULTIPROC_DIR for the workers this test starts (spawned
    workers import prometheus_client afresh, in multiprocess mode)."""
    folder = tmp_path / "prometheus"
    folder.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
    return folder


# -- the tests -------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_hits_of_spawned_workers_are_summed(multiproc_dir: Path, tmp_path: Path) -> None:
    """Three workers count known hits and end; none is ever scraped. The fleet's
    sums are exact: the hits included, which a collector reading stats() at
    scrape time lost (prometheus-client skips custom collectors in this mode)."""
    plan = [(3, 2), (5, 4), (7, 6)]
    ctx = multiprocessing.get_context("spawn")
    workers = [
        ctx.Process(target=count_and_exit, args=(hits, near, str(tmp_path / f"disk{i}")))
        for i, (hits, near) in enumerate(plan)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(90)
        assert worker.exitcode == 0
    wanted = expected(plan)
    assert seen(multiproc_dir, wanted) == wanted
    assert len(list(multiproc_dir.glob("counter_*.db"))) == len(plan)  # one file each


@pytest.mark.timeout(120)
def test_a_live_worker_flushes_its_hits_without_being_scraped(
    multiproc_dir: Path, tmp_path: Path
) -> None:
    """Workers that keep running (a server between requests) write their hits to
    their files by themselves, within about FLUSH_INTERVAL, while another process
    answers the scrapes."""
    plan = [(4, 1), (6, 3)]
    ctx = multiprocessing.get_context("spawn")
    release = ctx.Event()
    dones = [ctx.Event() for _ in plan]
    workers = [
        ctx.Process(
            target=count_and_stay,
            args=(hits, near, str(tmp_path / f"disk{i}"), done, release),
        )
        for i, ((hits, near), done) in enumerate(zip(plan, dones, strict=True))
    ]
    for worker in workers:
        worker.start()
    try:
        for done in dones:
            assert done.wait(90), "a worker did not finish its reads"
        wanted = expected(plan)
        wait_until(
            lambda: seen(multiproc_dir, wanted) == wanted,
            deadline=30,
            what="the live workers' hits in their files",
        )
        assert all(worker.is_alive() for worker in workers)  # flushed by themselves
    finally:
        release.set()
        for worker in workers:
            worker.join(30)
    assert all(worker.exitcode == 0 for worker in workers)
    assert seen(multiproc_dir, expected(plan)) == expected(plan)  # nothing counted twice


FORKING = """
import multiprocessing, os, sys
import stampede
from stampede.metrics.prometheus import PrometheusMetrics

metrics = PrometheusMetrics()
users = metrics.watch(stampede.CoalescingCache(ttl=60, name="users", metrics=metrics))

def read(n):
    for _ in range(n):
        users.get_or_load("k", lambda: 1)

if __name__ == "__main__":
    read(11)  # a miss, then 10 hits, counted before the fork: the parent's to export
    ctx = multiprocessing.get_context("fork")
    children = [ctx.Process(target=read, args=(n,)) for n in (3, 5, 7)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
        assert child.exitcode == 0, child.exitcode
    read(100)
"""


@pytest.mark.timeout(120)
@pytest.mark.skipif(sys.platform == "win32", reason="fork")
def test_forked_children_of_a_watching_parent_count_their_own_hits(
    multiproc_dir: Path, tmp_path: Path
) -> None:
    """gunicorn --preload: the parent watched its cache and counted hits before it
    forked. Each child exports only its own hits (its copy of the parent's counters
    is not exported again), and ends through os._exit, which skips atexit: its last
    hits are flushed by threading's exit hook."""
    script = tmp_path / "forking.py"
    script.write_text(textwrap.dedent(FORKING))
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    registry = summed(multiproc_dir)
    assert value(registry, "stampede_hits_total", "users") == 10 + 3 + 5 + 7 + 100
    assert value(registry, "stampede_misses_total", "users") == 1
    assert len(list(multiproc_dir.glob("counter_*.db"))) == 4  # the parent and 3 children
