"""Smoke test of an installed stampede (a wheel or sdist in a fresh virtualenv).

Run from outside the source tree, so that the installed copy is imported.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import pathlib
import sys
import threading

import stampede

here = pathlib.Path(stampede.__file__).resolve().parent
assert "site-packages" in str(here), f"imported the source tree, not the install: {here}"
assert (here / "py.typed").is_file(), "py.typed is not shipped"
assert importlib.metadata.version("stampede") == stampede.__version__, "version mismatch"
for name in stampede.__all__:
    assert hasattr(stampede, name), name

# One load for many threads.
calls = 0
gate = threading.Event()


def load() -> str:
    global calls
    calls += 1
    gate.wait(10)
    return "value"


cache: stampede.CoalescingCache[str] = stampede.CoalescingCache(ttl=60)
results: list[str] = []
threads = [
    threading.Thread(target=lambda: results.append(cache.get_or_load("k", load)))
    for _ in range(20)
]
for t in threads:
    t.start()
while cache.stats().coalesced < 19:
    threading.Event().wait(0.001)
gate.set()
for t in threads:
    t.join(10)
assert results == ["value"] * 20 and calls == 1, (results, calls)


# The decorator, async.
@stampede.cached(ttl=60)
async def double(x: int) -> int:
    return 2 * x


async def main() -> None:
    assert await asyncio.gather(*(double(21) for _ in range(100))) == [42] * 100
    assert double.cache_info().stats.loads == 1


asyncio.run(main())

# Optional integrations import lazily: the core must not pull them in.
import stampede.metrics  # noqa: E402

assert "prometheus_client" not in sys.modules and "opentelemetry" not in sys.modules
print(f"smoke test passed: stampede {stampede.__version__} from {here}")
