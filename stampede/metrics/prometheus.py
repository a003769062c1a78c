"""Prometheus metrics for stampede caches, with prometheus-client.

Wiring::

    from stampede import CoalescingCache, cached
    from stampede.metrics.prometheus import PrometheusMetrics

    metrics = PrometheusMetrics()  # registers on prometheus_client.REGISTRY
    users = CoalescingCache(ttl=60, name="users", metrics=metrics)
    metrics.watch(users)  # hits are read from users.stats() at scrape time

    @cached(ttl=60, metrics=metrics)  # its cache is named after the function
    def price(sku: str) -> int: ...

    metrics.watch(price)  # a @cached function: its .cache is watched

Exported, with the default ``prefix="stampede"``, labelled by ``cache`` (the
cache's ``name``):

- ``stampede_<event>_total``: one counter per event of the hook, named after
  the ``Stats`` field it mirrors: ``misses``, ``loads``, ``load_errors``,
  ``coalesced``, ``early_refreshes``, ``stale_served``, ``negative_hits``,
  ``fenced``, ``lease_waits``, ``lease_takeovers``, ``backend_errors``,
  ``serialization_errors``.
- ``stampede_hits_total``: hits of the caches passed to ``watch()``, read
  from ``stats()`` at scrape time (hits never reach the hook), and
  ``stampede_near_hits_total``: those of them served from the near cache.
- ``stampede_load_duration_seconds{outcome="ok"|"error"}``: time in loader
  calls, a histogram.
- ``stampede_wait_duration_seconds``: time callers waited for another
  caller's load, a histogram.

No hit-ratio gauge: a ratio since start-up flattens after warm-up and hides
a regression. Take it over a window instead, as ``Stats.hit_ratio`` counts::

    served = rate(stampede_hits_total[5m]) + rate(stampede_stale_served_total[5m])
             + rate(stampede_negative_hits_total[5m])
    hit ratio = served / (served + rate(stampede_misses_total[5m]))

(``stampede_hits_total`` is only there for watched caches; sum each series
``by (cache)`` before adding them.)
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Iterable, Sequence

from ._common import (
    DEFAULT_BUCKETS,
    EVENTS,
    LOAD_OUTCOMES,
    WAITS,
    Adapter,
    Watched,
    describe,
)

try:
    import prometheus_client
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from prometheus_client.core import CounterMetricFamily
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector
except ImportError as _exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "PrometheusMetrics needs prometheus-client: pip install 'stampede[prometheus]'"
    ) from _exc

__all__ = ["DEFAULT_BUCKETS", "PrometheusMetrics"]

_PREFIX = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


class PrometheusMetrics(Adapter):
    """A ``MetricsHook`` that exports a cache's events as Prometheus metrics.

    Instances made for the same registry and prefix share one set of metrics
    and one watch list (a library and the application may each make one);
    they must then ask for the same buckets.

    Args:
        registry: where the metrics are registered (default
            ``prometheus_client.REGISTRY``).
        prefix: the first part of every metric name.
        load_buckets: bucket bounds, in seconds, of the load-duration histogram.
        wait_buckets: bucket bounds, in seconds, of the wait-duration histogram.

    Raises:
        ValueError: the registry already has metrics of these names from
            another collector (pick another ``prefix``), another instance on
            this registry and prefix has other buckets, the prefix is not a
            classic metric name (letters, digits, ``_`` and ``:``), or the
            buckets are not valid for Prometheus.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        prefix: str = "stampede",
        load_buckets: Sequence[float] = DEFAULT_BUCKETS,
        wait_buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        if not _PREFIX.fullmatch(prefix):
            # Newer clients accept any UTF-8 name, but quoted names need a
            # Prometheus 3 server and break the usual PromQL: keep them classic.
            raise ValueError(f"prefix must match {_PREFIX.pattern}, got {prefix!r}")
        self._registry = prometheus_client.REGISTRY if registry is None else registry
        self._prefix = prefix
        self._sink = _exporter_for(
            self._registry, prefix, (tuple(load_buckets), tuple(wait_buckets))
        )

    @property
    def registry(self) -> CollectorRegistry:
        return self._registry



Buckets = tuple[tuple[float, ...], tuple[float, ...]]

# One exporter per registry and prefix. The exporter holds no reference to its
# registry, so a registry that goes away takes its entry with it.
_exporters: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, _Exporter]] = (
    weakref.WeakKeyDictionary()
)
_exporters_lock = threading.Lock()


def _exporter_for(registry: CollectorRegistry, prefix: str, buckets: Buckets) -> _Exporter:
    with _exporters_lock:
        per_prefix = _exporters.setdefault(registry, {})
        exporter = per_prefix.get(prefix)
        if exporter is not None:
            if exporter.buckets != buckets:
                raise ValueError(
                    f"a PrometheusMetrics with prefix {prefix!r} and other buckets is already "
                    "registered on this registry: use the same buckets, or another prefix"
                )
            return exporter
        exporter = _Exporter(prefix, buckets)
        try:
            registry.register(exporter)
        except ValueError as exc:  # names taken by another collector
            raise ValueError(
                f"cannot register stampede metrics with prefix {prefix!r}: {exc}. "
                "Pass another prefix="
            ) from exc
        per_prefix[prefix] = exporter
        return exporter


class _Exporter(Collector):
    """The metrics of one registry and prefix; a collector, so registration is all or nothing."""

    def __init__(self, prefix: str, buckets: Buckets) -> None:
        self.buckets = buckets
        self.watched = Watched()
        self._hits = f"{prefix}_hits"
        self._near_hits = f"{prefix}_near_hits"
        self._counters = {
            event: Counter(f"{prefix}_{event}", describe(event), ["cache"], registry=None)
            for event in EVENTS
        }
        self._load = Histogram(
            f"{prefix}_load_duration_seconds",
            "Time spent in loader calls, by outcome.",
            ["cache", "outcome"],
            registry=None,
            buckets=buckets[0],
        )
        self._wait = Histogram(
            f"{prefix}_wait_duration_seconds",
            "Time callers waited for another caller's load or another process's lease.",
            ["cache"],
            registry=None,
            buckets=buckets[1],
        )
        # (event, cache) -> the labelled counter and histogram it bumps: a dict
        # lookup instead of labels()' lock on every event.
        self._bound: dict[tuple[str, str], tuple[Counter, Histogram | None]] = {}

    def record(self, cache: str, event: str, duration: float | None) -> None:
        bound = self._bound.get((event, cache))
        if bound is None:
            counter = self._counters.get(event)
            if counter is None:
                return  # not a Stats counter: nothing of ours to bump
            histogram: Histogram | None = None
            if event in LOAD_OUTCOMES:
                histogram = self._load.labels(cache, LOAD_OUTCOMES[event])
            elif event in WAITS:
                histogram = self._wait.labels(cache)
            bound = self._bound[(event, cache)] = (counter.labels(cache), histogram)
        counter, histogram = bound
        counter.inc()
        if duration is not None and histogram is not None:
            histogram.observe(max(duration, 0.0))

    def _hit_families(self) -> list[tuple[str, CounterMetricFamily]]:
        return [
            (field, CounterMetricFamily(name, describe(field), labels=["cache"]))
            for field, name in (("hits", self._hits), ("near_hits", self._near_hits))
        ]

    def describe(self) -> Iterable[Metric]:
        """The metric names, for the registry's check of duplicates (no samples)."""
        for metric in (*self._counters.values(), self._load, self._wait):
            yield from metric.describe()
        for _, family in self._hit_families():
            yield family

    def collect(self) -> Iterable[Metric]:
        for metric in (*self._counters.values(), self._load, self._wait):
            yield from metric.collect()
        for field, family in self._hit_families():
            for name, hits in sorted(self.watched.hits(field).items()):
                family.add_metric([name], hits)
            yield family
