"""A process of tests/test_django.py and tests/test_flask.py (run as a script).

argv[1] is a JSON spec:

- ``framework``: "django" (``caches``: the CACHES setting, ``alias``: the cache
  to use, "proxy" for ``django.core.cache.cache``) or "flask" (``config``: the
  app's config for Flask-Caching);
- ``role``: "load" (``threads`` callers of one key; files in ``work``
  coordinate with the test: ready/<pid>, then wait for "go"; each load writes
  loads/<pid>-<n> and waits for "release"), "write" (stores ``value``; with
  ``clock_offset``, this process's monotonic clock runs that many seconds
  ahead, as another host's would), or "read";
- ``key``, and the cache's ``ttl``, ``stale_ttl``, ``namespace``, ``distributed``.

It prints one JSON line: what it got and its counters. tests/_frameworks.py
starts it and reads that line.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import stampede


def wait_for(path: Path, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while not path.exists():
        if time.monotonic() > end:
            raise SystemExit(f"gave up waiting for {path}")
        time.sleep(0.005)


def framework_cache(spec: dict[str, Any]) -> Any:
    """The framework's cache object the spec names, set up as an application would."""
    if spec["framework"] == "django":
        import django
        from django.conf import settings

        settings.configure(CACHES=spec["caches"])
        django.setup()
        from django.core.cache import cache, caches

        return cache if spec["alias"] == "proxy" else caches[spec["alias"]]
    import flask
    from flask_caching import Cache

    app = flask.Flask("worker")
    app.config.update(spec["config"])
    return Cache(app)


def main() -> None:
    spec: dict[str, Any] = json.loads(sys.argv[1])
    clock_offset = float(spec.get("clock_offset", 0.0))
    options: dict[str, Any] = {
        "ttl": float(spec.get("ttl", 60.0)),
        "stale_ttl": float(spec.get("stale_ttl", 0.0)),
        "namespace": spec.get("namespace", ""),
        "distributed": bool(spec.get("distributed", False)),
        "beta": 0.0,  # no early refresh: reads say fresh or not, nothing random
    }
    if clock_offset:
        options["clock"] = lambda: time.monotonic() + clock_offset
    cache: stampede.CoalescingCache[Any] = stampede.CoalescingCache(
        framework_cache(spec), **options
    )
    role, key = spec["role"], spec["key"]
    if role == "write":
        cache.set(key, spec["value"])
        print(json.dumps({"written_at": time.time(), "backend": repr(cache.backend)}))
    elif role == "read":
        value = cache.get(key)
        stats = cache.stats()
        print(json.dumps({"value": value, "hits": stats.hits, "stale": stats.stale_served}))
    else:
        load(cache, key, int(spec["threads"]), Path(spec["work"]))


def load(cache: stampede.CoalescingCache[Any], key: str, threads: int, work: Path) -> None:
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

    pool = [threading.Thread(target=caller) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    stats = cache.stats()
    print(
        json.dumps(
            {
                "values": sorted(set(got)),
                "calls": len(got),
                "loads": stats.loads,
                "backend": repr(cache.backend),
            }
        )
    )


if __name__ == "__main__":
    main()
