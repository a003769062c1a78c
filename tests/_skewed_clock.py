"""A process whose wall clock is skewed, for tests/test_clocks.py (run as a script).

argv: skew (seconds added to ``time.time``), role (write|read), store (a
redis:// or disk:// URL), ttl

``time.time`` and ``time.time_ns`` are patched before stampede (or a store's
library) is imported; ``time.monotonic``, stampede's clock, is not. It prints
its wall clock first, so the test can check the skew took. A writer then
stores "from-skewed" under "k" and prints "written"; a reader prints "ready",
waits for a line on stdin (the test has written), then watches "k" and prints
what it saw as one JSON line (``watch``).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

TTL_EXTRA = 30.0  # stale_ttl: the store keeps entries past ttl, stampede tells fresh from stale


def skew_wall_clock(seconds: float) -> None:
    real, real_ns = time.time, time.time_ns
    time.time = lambda: real() + seconds
    time.time_ns = lambda: real_ns() + int(seconds * 1e9)


def make_cache(url: str, ttl: float) -> Any:
    import stampede

    return stampede.CoalescingCache(url, ttl=ttl, stale_ttl=TTL_EXTRA, beta=0, namespace="clock")


def watch(cache: Any, key: str, limit: float) -> dict[str, Any]:
    """Read ``key`` until it is no longer fresh (or ``limit`` seconds pass).

    ``fresh_at_first``: the first read was a fresh hit; ``fresh_for``: seconds
    from the first read to the first read that was not fresh (None: fresh all
    along); ``then``: what that read returned (the stale value, or None: gone).
    """
    start = time.monotonic()
    first = cache.get(key)
    stats = cache.stats()
    fresh_at_first = first is not None and stats.hits == 1 and stats.stale_served == 0
    while time.monotonic() - start < limit:
        value = cache.get(key)
        if value is None or cache.stats().stale_served:
            return {
                "fresh_at_first": fresh_at_first,
                "fresh_for": time.monotonic() - start,
                "then": value,
            }
        time.sleep(0.01)
    return {"fresh_at_first": fresh_at_first, "fresh_for": None, "then": None}


def main() -> None:
    skew, role, url, ttl = float(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
    skew_wall_clock(skew)
    print(time.time(), flush=True)
    cache = make_cache(url, ttl)
    if role == "write":
        cache.get_or_load("k", lambda: "from-skewed")
        print("written", flush=True)
    else:
        print("ready", flush=True)
        sys.stdin.readline()
        print(json.dumps(watch(cache, "k", ttl + 10.0)), flush=True)


if __name__ == "__main__":
    main()
