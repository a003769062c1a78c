"""What the Prometheus and OpenTelemetry adapters share: the events, their
help texts, and the weakly held list of caches whose hits are read from
their counters (hits never reach the hook: the hit path makes no calls).
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
from .._idem import COUNTERS as IDEM_COUNTERS
from .._stats import _FIELDS, Counters

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
    "not_stored": "Loaded values kept out of the cache (cache_if, or a ttl function).",
    "backend_errors": "Backend operations that failed.",
    "serialization_errors": "Values that could not be encoded, or entries not decoded.",
    "breaker_opened": "Times the store's circuit breaker opened (counted by the cache "
    "whose call opened it).",
    "breaker_closed": "Times the store's circuit breaker closed again (counted by the cache "
    "whose call closed it).",
    "idempotency_executed": "Idempotent work run (under a claim, or unprotected).",
    "idempotency_replayed": "Idempotent calls answered by a recorded or shared outcome.",
    "idempotency_waited": "Idempotent calls that waited for another process's run.",
    "idempotency_rejected": "Idempotent calls refused as InFlight.",
    "idempotency_key_reused": "Idempotent calls refused as KeyReused (another fingerprint).",
    "idempotency_takeovers": "Idempotency claims taken over after their owner vanished.",
    "idempotency_fenced": "Idempotent outcomes not recorded: the claim was lost meanwhile.",
    "idempotency_released": "Idempotency claims released by an exception not recorded.",
    "idempotency_unreplayable": "Idempotent outcomes recorded as not replayable.",
    "idempotency_unprotected": "Idempotent work run with the store down (fail-open).",
}

# The events a hook receives: every Stats counter but the hits (read from stats()
# at collection time: the hit paths call nothing). Built from the
# counters themselves, so a counter added to the core is exported too.
EVENTS: tuple[str, ...] = tuple(name for name in _FIELDS if name not in ("hits", "near_hits"))
# And an Idempotency's counters (labelled by its namespace), as idempotency_<counter>.
EVENTS += tuple(f"idempotency_{name}" for name in IDEM_COUNTERS)

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


class _Seen:
    """A watched cache: its name, its live counters, and the hits already exported."""

    __slots__ = ("name", "counters", "hits", "near_hits")

    def __init__(self, cache: CacheBase[Any]) -> None:
        self.name = cache.name
        # Held strongly (a few ints, not the cache): read once more after the cache
        # is gone, so that its last hits are exported too.
        self.counters: Counters = cache._counters
        self.hits = self.near_hits = 0  # exported so far: hits before watch() count too


def _hits(counters: Counters) -> tuple[int, int]:
    """(hits, near hits) as ``Stats`` counts them: the hits include the near ones."""
    near = counters.near_hits
    return counters.hits + near, near


class Watched:
    """Caches held by weak reference, and the hits read from their counters.

    ``hits()`` gives totals per cache name (an observable counter, read at
    collection); ``deltas()`` the hits since its previous call (added to a
    real counter, which multiprocess Prometheus can sum across processes).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards _caches (watch(), scrapes, flushes: any thread)
        self._caches: dict[weakref.ref[CacheBase[Any]], _Seen] = {}

    def add(self, target: object) -> None:
        cache = resolve(target)
        ref = weakref.ref(cache)  # equal to any other live reference to the cache
        with self._lock:
            if ref not in self._caches:
                self._caches[ref] = _Seen(cache)

    def hits(self, field: str = "hits") -> dict[str, int]:
        """Hits (or ``near_hits``) per cache name, of the caches alive; caches of one
        name (say two ``"default"``) add up."""
        with self._lock:
            for ref in [ref for ref in self._caches if ref() is None]:
                del self._caches[ref]
            seen = list(self._caches.values())
        totals: dict[str, int] = {}
        for one in seen:
            hits, near = _hits(one.counters)
            totals[one.name] = totals.get(one.name, 0) + (near if field == "near_hits" else hits)
        return totals

    def deltas(self) -> list[tuple[str, int, int]]:
        """(cache name, hits, near hits) counted since the previous call, per cache
        that has new ones; a cache garbage-collected since gives its last ones and
        is forgotten."""
        news: list[tuple[str, int, int]] = []
        with self._lock:
            for ref, seen in list(self._caches.items()):
                gone = ref() is None  # before the read: a dead cache's counters are final
                hits, near = _hits(seen.counters)
                new_hits, new_near = hits - seen.hits, near - seen.near_hits
                seen.hits, seen.near_hits = hits, near
                if new_hits > 0 or new_near > 0:
                    news.append((seen.name, max(new_hits, 0), max(new_near, 0)))
                if gone:
                    del self._caches[ref]
        return news

    def forked(self, rebase: bool) -> None:
        """In a child process just forked: a fresh lock (a thread of the parent may have
        held it) and, with ``rebase``, the hits so far taken as exported (the parent
        exports them; the child only what it counts from now on)."""
        self._lock = threading.Lock()
        if rebase:
            for seen in self._caches.values():
                seen.hits, seen.near_hits = _hits(seen.counters)


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
        """Export the hits of ``cache`` (its ``stats().hits`` and ``.near_hits``).

        ``cache`` is a ``CoalescingCache``, an ``AsyncCoalescingCache`` or a
        ``@cached`` function (its ``.cache``). It is held by weak reference.
        Watching a cache twice counts it once; caches of one name are summed.
        How the hits are read depends on the adapter: see its module. Returns
        ``cache``, so that ``cache = metrics.watch(CoalescingCache(...))`` works.

        Raises:
            TypeError: ``cache`` is none of the above.
        """
        self._sink.watched.add(cache)
        return cache

    def __repr__(self) -> str:
        return f"{type(self).__name__}(prefix={self._prefix!r})"
