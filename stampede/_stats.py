"""Counters and their frozen snapshot.

Counters are plain ints bumped without a lock: with the GIL an increment of
an attribute is not split by a thread switch in practice, and the hit path
cannot afford a lock. Treat the numbers as monitoring data, not accounting.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Protocol

log = logging.getLogger("stampede")

_FIELDS = (
    "hits",  # served a fresh value (near hits included)
    "near_hits",  # of those, served from the near cache (no I/O)
    "misses",  # found nothing usable and loaded (or joined a load) in the foreground
    "loads",  # loader calls that returned a value
    "load_errors",  # loader calls that raised
    "not_stored",  # loaded values kept out of the cache (cache_if, a ttl function)
    "coalesced",  # callers that waited for another caller's load instead of loading
    "early_refreshes",  # background refreshes started before expiry (XFetch; distributed:
    # those this process ran, holding the lease)
    "stale_served",  # expired values served (while revalidating, or instead of an error)
    "negative_hits",  # cached errors raised again
    "fenced",  # finished loads not stored because the key was invalidated or set meanwhile
    "lease_waits",  # distributed: waits for another process's lease
    "lease_takeovers",  # distributed: leases taken over after their owner vanished
    "backend_errors",  # backend operations that failed
    "serialization_errors",  # values that could not be encoded, entries not decoded
    # The store's circuit breaker opened / closed again. The breaker is shared by the
    # caches on one store: a transition counts in the cache whose call made it.
    "breaker_opened",
    "breaker_closed",
)


@dataclasses.dataclass(frozen=True)
class Stats:
    """A frozen snapshot of a cache's counters (see ``CoalescingCache.stats``)."""

    hits: int = 0
    near_hits: int = 0
    misses: int = 0
    loads: int = 0
    load_errors: int = 0
    not_stored: int = 0
    coalesced: int = 0
    early_refreshes: int = 0
    stale_served: int = 0
    negative_hits: int = 0
    fenced: int = 0
    lease_waits: int = 0
    lease_takeovers: int = 0
    backend_errors: int = 0
    serialization_errors: int = 0
    breaker_opened: int = 0
    breaker_closed: int = 0
    load_time: float = 0.0  # seconds spent in loader calls, summed

    @property
    def hit_ratio(self) -> float:
        """Reads served from the cache (fresh, stale or negative) over all reads."""
        served = self.hits + self.stale_served + self.negative_hits
        total = served + self.misses
        return served / total if total else 0.0


class Counters:
    """The live, mutable counters behind ``Stats``."""

    __slots__ = (*_FIELDS, "load_time")

    hits: int
    near_hits: int
    misses: int
    loads: int
    load_errors: int
    not_stored: int
    coalesced: int
    early_refreshes: int
    stale_served: int
    negative_hits: int
    fenced: int
    lease_waits: int
    lease_takeovers: int
    backend_errors: int
    serialization_errors: int
    breaker_opened: int
    breaker_closed: int
    load_time: float

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        for name in _FIELDS:
            setattr(self, name, 0)
        self.load_time = 0.0

    def snapshot(self) -> Stats:
        fields = {name: getattr(self, name) for name in self.__slots__}
        fields["hits"] += fields["near_hits"]  # counted apart by the hit paths
        return Stats(**fields)


class MetricsHook(Protocol):
    """Receives the slow-path events of a cache, for Prometheus, OpenTelemetry, logs.

    ``event`` is the name of the ``Stats`` counter it bumps (``"misses"``,
    ``"loads"``, ``"load_errors"``, ``"coalesced"``, ``"early_refreshes"``,
    ``"stale_served"``, ``"negative_hits"``, ``"fenced"``, ``"backend_errors"``,
    ``"serialization_errors"``, ``"breaker_opened"``, ``"breaker_closed"``, ...).
    ``duration`` is set for ``"loads"`` and ``"load_errors"`` (time in the
    loader), ``"coalesced"`` (time spent waiting for another caller's load in
    this process) and ``"lease_waits"`` (time spent waiting for another
    process's lease; sent when the wait ends, while ``stats()`` counts it
    when it starts). Hits are not sent, to keep the hit path free of calls:
    the adapters' ``watch()`` reads them from the cache's counters.

    ``record`` runs on the caller's thread: keep it quick and never raise.
    """

    def record(self, cache: str, event: str, duration: float | None = None) -> None: ...


class LoggingMetrics:
    """A ``MetricsHook`` that writes each event to a logger (``stampede.metrics``)."""

    def __init__(self, logger: logging.Logger | None = None, level: int = logging.DEBUG) -> None:
        self.logger: logging.Logger = logger or logging.getLogger("stampede.metrics")
        self.level: int = level

    def record(self, cache: str, event: str, duration: float | None = None) -> None:
        if not self.logger.isEnabledFor(self.level):
            return
        if duration is None:
            self.logger.log(self.level, "%s %s", cache, event)
        else:
            self.logger.log(self.level, "%s %s %.3f ms", cache, event, duration * 1000)


class Recorder:
    """A cache's counters and its metrics hook, told of each slow-path event.

    The hit path bumps ``counters.hits`` itself and calls nothing.
    """

    __slots__ = ("counters", "metrics", "name")

    def __init__(self, metrics: MetricsHook | None, name: str) -> None:
        self.counters: Counters = Counters()
        self.metrics: MetricsHook | None = metrics
        self.name: str = name

    def count(self, event: str, duration: float | None = None) -> None:
        """Bump the counter ``event`` and tell the metrics hook."""
        counters = self.counters
        setattr(counters, event, getattr(counters, event) + 1)
        if self.metrics is not None:
            self.emit(event, duration)

    def count_load(self, event: str, spent: float) -> None:
        """A finished loader call (``"loads"`` or ``"load_errors"``) and its time."""
        # Counted once the entry is written: whoever sees the count sees the entry.
        self.counters.load_time += spent
        self.count(event, spent)

    def emit(self, event: str, duration: float | None = None) -> None:
        """Tell the metrics hook only (the counter was bumped earlier, or is not one)."""
        if self.metrics is None:
            return
        try:
            self.metrics.record(self.name, event, duration)
        except Exception:
            log.warning("metrics hook failed", exc_info=True)
