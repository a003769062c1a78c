"""A process of the fleet for tests/test_distributed.py (run as a script).

argv: kind (redis|disk), where (URL or folder), key, threads, workdir, lease_ttl,
and optionally "async": tasks on AsyncCoalescingCache instead of threads

Files in workdir coordinate with the test, across processes: the worker writes
ready/<pid> and waits for "go"; each load writes loads/<pid>-<n> and waits for
"release". It prints one JSON line: the values its callers got, and its stats.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import stampede


def wait_for(path: Path, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while not path.exists():
        if time.monotonic() > end:
            raise SystemExit(f"gave up waiting for {path}")
        time.sleep(0.005)


def report(stats: stampede.Stats, got: list[str]) -> None:
    """One JSON line for the test: what the callers got and the process's counters."""
    print(
        json.dumps(
            {
                "pid": os.getpid(),
                "values": sorted(set(got)),
                "calls": len(got),
                "lease_waits": stats.lease_waits,
                "lease_takeovers": stats.lease_takeovers,
                "fenced": stats.fenced,
                "loads": stats.loads,
            }
        )
    )


def main() -> None:
    if sys.argv[7:] == ["async"]:
        import asyncio

        asyncio.run(amain())  # must also end: a listener ignoring its cancel would hang here
        return
    kind, where, key, threads, workdir, lease_ttl = sys.argv[1:7]
    work = Path(workdir)
    if kind == "redis":
        import redis

        store: object = redis.Redis.from_url(where, socket_timeout=5)
    else:
        import diskcache

        store = diskcache.Cache(where)
    cache: stampede.CoalescingCache[str] = stampede.CoalescingCache(
        store, ttl=60, distributed=True, lease_ttl=float(lease_ttl)
    )
    counter = iter(range(10**6))
    lock = threading.Lock()

    def loader() -> str:
        with lock:
            n = next(counter)
        (work / "loads" / f"{os.getpid()}-{n}").touch()
        wait_for(work / "release")
        return f"value-from-{os.getpid()}"

    (work / "ready" / str(os.getpid())).touch()
    wait_for(work / "go")
    got: list[str] = []

    def caller() -> None:
        value = cache.get_or_load(key, loader)
        with lock:
            got.append(value)

    pool = [threading.Thread(target=caller) for _ in range(int(threads))]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    report(cache.stats(), got)


async def amain() -> None:
    import asyncio

    kind, where, key, tasks, workdir, lease_ttl = sys.argv[1:7]
    work = Path(workdir)
    if kind == "redis":
        import redis.asyncio

        store: object = redis.asyncio.Redis.from_url(where, socket_timeout=5)
    else:
        import diskcache

        store = diskcache.Cache(where)
    cache: stampede.AsyncCoalescingCache[str] = stampede.AsyncCoalescingCache(
        store, ttl=60, distributed=True, lease_ttl=float(lease_ttl)
    )
    loads = 0

    async def loader() -> str:
        nonlocal loads
        loads += 1
        (work / "loads" / f"{os.getpid()}-{loads}").touch()
        while not (work / "release").exists():
            await asyncio.sleep(0.005)
        return f"value-from-{os.getpid()}"

    (work / "ready" / str(os.getpid())).touch()
    while not (work / "go").exists():
        await asyncio.sleep(0.005)
    got = await asyncio.gather(*(cache.get_or_load(key, loader) for _ in range(int(tasks))))
    report(cache.stats(), got)


if __name__ == "__main__":
    main()
