"""A process of the fleet for tests/test_batch.py (run as a script).

argv: redis URL, namespace, workdir, threads, keys (comma-separated), "async"|"sync".

Every thread (or task) calls ``get_or_load_many`` over the keys once "go" exists
in workdir; the batch loader counts each key it loads with ``INCR`` on Redis,
writes ``loading`` to workdir, and waits for ``release``. Prints one JSON line:
whether every caller got every value right, and the process's counters.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import redis
import redis.asyncio

import stampede


def wait_for(path: Path, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while not path.exists():
        if time.monotonic() > end:
            raise SystemExit(f"gave up waiting for {path}")
        time.sleep(0.002)


def main() -> None:
    url, namespace, workdir, threads, keys, flavour = sys.argv[1:7]
    work = Path(workdir)
    wanted = keys.split(",")
    counter = redis.Redis.from_url(url)
    right: list[bool] = []

    def load(missing: list[str]) -> dict[str, str]:
        for key in missing:
            counter.incr(f"loads:{namespace}:{key}")
        (work / "loading").touch()
        wait_for(work / "release")
        return {key: f"v-{key}" for key in missing}

    expected = {key: f"v-{key}" for key in wanted}
    if flavour == "sync":
        cache: stampede.CoalescingCache[str] = stampede.CoalescingCache(
            redis.Redis.from_url(url), ttl=60, distributed=True, namespace=namespace, lease_ttl=5
        )

        def call() -> None:
            right.append(cache.get_or_load_many(wanted, load) == expected)

        (work / f"ready-{id(cache)}").touch()
        wait_for(work / "go")
        started = [threading.Thread(target=call) for _ in range(int(threads))]
        for t in started:
            t.start()
        for t in started:
            t.join(60)
        stats = cache.stats()
    else:

        async def run() -> stampede.Stats:
            acache: stampede.AsyncCoalescingCache[str] = stampede.AsyncCoalescingCache(
                redis.asyncio.Redis.from_url(url),
                ttl=60,
                distributed=True,
                namespace=namespace,
                lease_ttl=5,
            )

            async def aload(missing: list[str]) -> dict[str, str]:
                return await asyncio.to_thread(load, missing)

            async def call() -> None:
                right.append(await acache.get_or_load_many(wanted, aload) == expected)

            (work / f"ready-{id(acache)}").touch()
            await asyncio.to_thread(wait_for, work / "go")
            await asyncio.gather(*(call() for _ in range(int(threads))))
            return acache.stats()

        stats = asyncio.run(run())
    report: dict[str, Any] = {
        "right": len(right) == int(threads) and all(right),
        "loads": stats.loads,
        "lease_waits": stats.lease_waits,
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
