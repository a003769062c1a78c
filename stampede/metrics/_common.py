"""What the Prometheus and OpenTelemetry adapters share: the events, their
help texts, and the weakly held list of caches whose hits are read at scrape
time (hits never reach the hook: the hit path makes no calls).
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any, Protocol, TypeVar

from .._acache import AsyncCoalescingCache
from .._base import CacheBase
from .._cache import CoalescingCache
from .._decorator import AsyncCachedFunction, CachedFunction
from .._stats import _FIELDS

log = logging.getLogger("stampede.metrics")

# What watch() takes, and gives back.
Watchable = TypeVar(
    "Watchable",
    bound=CoalescingCache[Any]
    | AsyncCoalescingCache[Any]
    | CachedFunction[..., Any]
    | AsyncCachedFunction[..., Any],
)

_HELP = {
    "hits": "Reads served a fresh value from the cache.",
    "near_hits": "Of the hits, those served from the near cache (no I/O).",
    "misses": "Reads that found nothing usable and loaded, or joined a load, in the foreground.",
    "loads": "Loader calls that returned a value.",
    "load_errors": "Loader calls that raised.",
    "coalesced": "Callers that waited for another caller's load instead of loading.",
    "early_refreshes": "Background refreshes started before expiry (XFetch).",
    "stale_served": "Expired values served, while revalidating or instead of an error.",
    "negative_hits": "Cached errors raised again.",
    "fenced": "Finished loads not stored: the key was invalidated or set meanwhile.",
    "lease_waits": "Waits for another process's lease (distributed caches).",
    "lease_takeovers": "Leases taken over after their owner vanished (distributed caches).",
    "backend_errors": "Backend operations that failed.",
    "serialization_errors": "Values that could not be encoded, or entries not decoded.",
}

# The events a hook receives: every Stats counter but the hits (read from stats()
# at collection time: the hit paths call nothing). Built from the
# counters themselves, so a counter added to the core is exported too.
EVENTS: tuple[str, ...] = tuple(name for name in _FIELDS if name not in ("hits", "near_hits"))

# Bucket bounds in seconds (the OpenTelemetry SDK's defaults are meant for
# milliseconds): loaders range from a sub-millisecond lookup to a long report.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

# Events whose duration goes to the load histogram, with their outcome.
LOAD_OUTCOMES = {"loads": "ok", "load_errors": "error"}
# Events whose duration goes to the wait histogram (a lease wait: when it ends).
WAITS = frozenset({"coalesced", "lease_waits"})


def describe(event: str) -> str:
    return _HELP.get(event, f"{event.replace('_', ' ').capitalize()} (a stampede counter).")


def resolve(target: object) -> CacheBase[Any]:
    """The cache behind ``target``: a cache itself, or a ``@cached`` function's ``.cache``."""
    if isinstance(target, CacheBase):
        return target
    inner = getattr(target, "cache", None)
    if isinstance(inner, CacheBase):
        return inner
    raise TypeError(
        "watch() takes a CoalescingCache, an AsyncCoalescingCache or a @cached function, "
        f"not {type(target).__name__}"
    )


class Watched:
    """Caches held by weak reference, their hits summed by cache name on demand."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards _caches (watch() and scrapes on any thread)
        self._caches: weakref.WeakSet[CacheBase[Any]] = weakref.WeakSet()

    def add(self, target: object) -> None:
        cache = resolve(target)
        with self._lock:
            self._caches.add(cache)

    def hits(self, field: str = "hits") -> dict[str, int]:
        """Hits (or ``near_hits``) per cache name; caches of one name (say two
        ``"default"``) add up."""
        with self._lock:
            caches = list(self._caches)  # strong refs: none dies halfway through
        totals: dict[str, int] = {}
        for cache in caches:
            try:
                name, hits = cache.name, getattr(cache.stats(), field)
            except Exception:  # a scrape must not fail because of one cache
                log.warning("could not read the stats of %r", cache, exc_info=True)
                continue
            totals[name] = totals.get(name, 0) + hits
        return totals


class Sink(Protocol):
    """What an adapter feeds: its instruments, shared per registry or meter and prefix."""

    watched: Watched

    def record(self, cache: str, event: str, duration: float | None) -> None: ...


class Adapter:
    """The ``MetricsHook`` surface both adapters share: ``record``, ``watch``, ``prefix``."""

    _sink: Sink
    _prefix: str

    @property
    def prefix(self) -> str:
        """The first part of every metric name."""
        return self._prefix

    def record(self, cache: str, event: str, duration: float | None = None) -> None:
        """Count ``event`` for ``cache`` and time it if it carries a duration.

        Never raises. An event that is not a ``Stats`` counter is ignored.
        """
        try:
            self._sink.record(cache, event, duration)
        except Exception:  # a metrics failure must not fail a cache read
            log.warning(
                "%s.record(%r, %r) failed", type(self).__name__, cache, event, exc_info=True
            )

    def watch(self, cache: Watchable) -> Watchable:
        """Export the hits of ``cache``, read from its ``stats()`` when metrics are collected.

        ``cache`` is a ``CoalescingCache``, an ``AsyncCoalescingCache`` or a
        ``@cached`` function (its ``.cache``). It is held by weak reference:
        once it is garbage-collected it is no longer reported. Watching a cache
        twice counts it once; caches of one name are summed (if one of them
        goes, the sum drops: Prometheus reads that as a counter reset). Returns
        ``cache``, so that ``cache = metrics.watch(CoalescingCache(...))`` works.

        Raises:
            TypeError: ``cache`` is none of the above.
        """
        self._sink.watched.add(cache)
        return cache

    def __repr__(self) -> str:
        return f"{type(self).__name__}(prefix={self._prefix!r})"
