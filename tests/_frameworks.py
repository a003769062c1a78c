"""What tests/test_django.py and tests/test_flask.py share: worker processes
(tests/_framework_worker.py), Redis look-ups, and the conformance suite as the
framework adapters pass it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stampede.backends import SharedStore
from stampede.testing.conformance import BackendConformance

WORKER = Path(__file__).with_name("_framework_worker.py")
ROOT = WORKER.parent.parent


def start(spec: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """The JSON line a worker printed (it must succeed)."""
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one worker to its end."""
    return result(start(spec))


def stored_keys(url: str) -> set[str]:
    """Every key in the Redis database at ``url``."""
    import redis

    with redis.Redis.from_url(url) as client:
        return {key.decode() if isinstance(key, bytes) else str(key) for key in client.keys("*")}


def lease_waiters(redis_url: str, namespace: str = "") -> Callable[[], int]:
    """How many processes listen for the end of a lease in ``namespace`` (each
    subscribes its one pub/sub connection to the namespace's channel)."""
    import redis

    channel = f"stampede:lease-done:{namespace}"

    def count() -> int:
        with redis.Redis.from_url(redis_url) as client:
            return int(client.pubsub_numsub(channel)[0][1])

    return count


def one_load_across_processes(
    spec: dict[str, Any],
    work: Path,
    waiting: Callable[[], int],
    processes: int = 3,
    threads: int = 4,
) -> tuple[list[str], list[dict[str, Any]]]:
    """``processes`` workers of ``threads`` callers each ask for one cold key at once;
    the first load is held until the other processes wait for its lease
    (``waiting()``): (the loads, each worker's result)."""
    from stampede.testing import wait_until

    for sub in ("ready", "loads"):
        (work / sub).mkdir()
    procs = [
        start({**spec, "role": "load", "threads": threads, "work": str(work)})
        for _ in range(processes)
    ]
    try:
        wait_until(lambda: len(list((work / "ready").iterdir())) >= processes, deadline=60)
        (work / "go").touch()
        wait_until(lambda: any((work / "loads").iterdir()), deadline=30)
        wait_until(lambda: waiting() >= processes - 1, deadline=30, what="lease waiters")
    finally:
        (work / "release").touch()  # never leave a worker waiting
    results = [result(p) for p in procs]
    return sorted(p.name for p in (work / "loads").iterdir()), results


class AdapterConformance(BackendConformance):
    """The suite, with the one promise a framework's cache API cannot keep."""

    def test_an_oversized_entry_is_a_counted_miss_and_never_fetched(self, backend: Any) -> None:
        # The framework hands a value over whole: a planted giant is fetched, then
        # refused unread (a counted miss). The bound on what a read allocates, which
        # Redis and disk keep, does not hold (docs/integrations/*.md say so).
        cache = self.make_cache(backend, namespace="big")
        store = cache.backend
        assert isinstance(store, SharedStore)
        key = store.key_maker("big")("k")
        assert isinstance(key, str)
        self.damage(backend, key, b"\xa5" * (4 * store.max_value_size))
        assert cache.get_or_load("k", lambda: "small") == "small"
        s = cache.stats()
        assert (s.serialization_errors, s.misses, s.loads) == (1, 1, 1)
        assert cache.get("k") == "small"  # rewritten, readable again
