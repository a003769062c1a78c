"""Prometheus metrics for stampede caches, with prometheus-client.

Wiring::

    from stampede import CoalescingCache, cached
    from stampede.metrics.prometheus import PrometheusMetrics

    metrics = PrometheusMetrics()  # registers on prometheus_client.REGISTRY
    users = CoalescingCache(ttl=60, name="users", metrics=metrics)
    metrics.watch(users)  # its hits are exported too

    @cached(ttl=60, metrics=metrics)  # its cache is named after the function
    def price(sku: str) -> int: ...

    metrics.watch(price)  # a @cached function: its .cache is watched

Exported, with the default ``prefix="stampede"``, labelled by ``cache`` (the
cache's ``name``):

- ``stampede_<event>_total``: one counter per event of the hook, named after
  the ``Stats`` field it mirrors: ``misses``, ``loads``, ``load_errors``,
  ``not_stored``, ``coalesced``, ``early_refreshes``, ``stale_served``,
  ``negative_hits``, ``fenced``, ``lease_waits``, ``lease_takeovers``,
  ``backend_errors``, ``serialization_errors``, ``breaker_opened``,
  ``breaker_closed``.
- ``stampede_hits_total``: hits of the caches passed to ``watch()``, and
  ``stampede_near_hits_total``: those of them served from the near cache.
  Hits never reach the hook (the hit path makes no calls): the cache's
  counters are read, and what they counted since the last read is added to
  these counters ("flushed") at each scrape of the process.
- ``stampede_load_duration_seconds{outcome="ok"|"error"}``: time in loader
  calls, a histogram.
- ``stampede_wait_duration_seconds``: time callers waited for another
  caller's load, a histogram.

Several worker processes (gunicorn, ``uvicorn --workers``): prometheus-client's
multiprocess mode. Set ``PROMETHEUS_MULTIPROC_DIR`` to an empty folder before
the workers start (before ``prometheus_client`` is imported), make the
metrics and ``watch()`` the caches in each worker as usual, and serve
``/metrics`` from a registry that reads every worker's files::

    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    def metrics_endpoint() -> bytes:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)

Every series above is then summed over the workers, the hits included:
each worker writes them to its own files by itself, since the worker that
answers a scrape reads the others' files and never asks them. A thread of
each worker flushes its hits every ``FLUSH_INTERVAL`` (1) seconds, and once
more when the process exits normally (a worker killed, or ended with
``os._exit``, loses at most its last second of hits; ``flush()`` before
``os._exit`` keeps them). So a scrape sees a worker's hits up to about a
second late, while its events (misses, loads, ...) are written as they
happen: a hit ratio over a window of minutes is not affected. stampede
exports no gauges, so ``multiprocess_mode`` and ``mark_process_dead`` do
not concern its metrics; the counters of a worker that ended stay in the
sums, as Prometheus counters should.

No hit-ratio gauge: a ratio since start-up flattens after warm-up and hides
a regression. Take it over a window instead, as ``Stats.hit_ratio`` counts::

    served = rate(stampede_hits_total[5m]) + rate(stampede_stale_served_total[5m])
             + rate(stampede_negative_hits_total[5m])
    hit ratio = served / (served + rate(stampede_misses_total[5m]))

(``stampede_hits_total`` is only there for watched caches; sum each series
``by (cache)`` before adding them.)
"""

from __future__ import annotations

import atexit
import os
import re
import threading
import time
import weakref
from collections.abc import Iterable, Sequence

from .._throttle import Throttle
from ._common import (
    DEFAULT_BUCKETS,
    EVENTS,
    LOAD_OUTCOMES,
    WAITS,
    Adapter,
    Watchable,
    Watched,
    describe,
    log,
    resolve,
)

try:
    import prometheus_client
    import prometheus_client.values
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector
except ImportError as _exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "PrometheusMetrics needs prometheus-client: pip install 'stampede[prometheus]'"
    ) from _exc

__all__ = ["DEFAULT_BUCKETS", "FLUSH_INTERVAL", "PrometheusMetrics", "flush"]

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
        self._exporter = _exporter_for(
            self._registry, prefix, (tuple(load_buckets), tuple(wait_buckets))
        )
        self._sink = self._exporter

    @property
    def registry(self) -> CollectorRegistry:
        return self._registry

    def watch(self, cache: Watchable) -> Watchable:
        """Export the hits of ``cache`` as ``stampede_hits_total`` (and near hits).

        The hits it counts are added to the counters at each scrape of this
        process and, in multiprocess mode, every ``FLUSH_INTERVAL`` seconds and
        as the process exits (see the module docstring). It is held by weak
        reference; the hits it counted stay in the counters after it is
        garbage-collected. Watching a cache twice counts it once; caches of one
        name are summed. Returns ``cache``.

        Raises:
            TypeError: ``cache`` is not a cache or a ``@cached`` function.
        """
        super().watch(cache)
        self._exporter.watching(cache)
        if _multiprocess():
            _keep_flushing()
        return cache


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
        self._counters = {
            event: Counter(f"{prefix}_{event}", describe(event), ["cache"], registry=None)
            for event in EVENTS
        }
        # Hits are real counters too, advanced by what the watched caches counted
        # since the last flush: a custom collector would be skipped in multiprocess mode.
        self._hits = Counter(f"{prefix}_hits", describe("hits"), ["cache"], registry=None)
        self._near_hits = Counter(
            f"{prefix}_near_hits", describe("near_hits"), ["cache"], registry=None
        )
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
        with _flush_lock:
            _everyone.add(self)

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

    def watching(self, target: object) -> None:
        """Show a watched cache's hit series from the start, at 0 until its first hit."""
        name = resolve(target).name
        self._hits.labels(name)
        self._near_hits.labels(name)

    def flush(self) -> None:
        """Add the hits the watched caches counted since the last flush to the counters.
        The caller holds ``_flush_lock``."""
        for cache, hits, near_hits in self.watched.deltas():
            if hits:
                self._hits.labels(cache).inc(hits)
            if near_hits:
                self._near_hits.labels(cache).inc(near_hits)

    def _metrics(self) -> tuple[Counter | Histogram, ...]:
        return (*self._counters.values(), self._hits, self._near_hits, self._load, self._wait)

    def describe(self) -> Iterable[Metric]:
        """The metric names, for the registry's check of duplicates (no samples)."""
        for metric in self._metrics():
            yield from metric.describe()

    def collect(self) -> Iterable[Metric]:
        with _flush_lock:  # a scrape of this process sees every hit counted so far
            _flushed(self)
        for metric in self._metrics():
            yield from metric.collect()


# -- flushing the hits ---------------------------------------------------------------
#
# A scrape flushes the hits of its own process (collect). In multiprocess mode
# the scraping process reads the other workers' files, so each worker also
# flushes on its own: a thread wakes every FLUSH_INTERVAL seconds (and once more
# as the process exits, from threading's exit hooks, which multiprocessing's
# forked children run too; os._exit and SIGKILL skip it). The hit path itself
# is untouched: it bumps an int, as it always did.

FLUSH_INTERVAL: float = 1.0  # seconds between two flushes of a worker's hits, in multiprocess mode

# One flush at a time in this process; also held across fork(), so that the
# flushing thread is never inside prometheus-client's file lock when a process
# forks (the child would wait on that lock for ever).
_flush_lock = threading.Lock()
_everyone: weakref.WeakSet[_Exporter] = weakref.WeakSet()  # every exporter of this process
_flusher: threading.Thread | None = None  # guarded by _flush_lock
_exit_hooked = False  # the last flush is registered (a forked child inherits it)
_complaints = Throttle(60.0)  # a flush that keeps failing: one line a minute


def _multiprocess() -> bool:
    """Whether prometheus-client writes its values to per-process files
    (``PROMETHEUS_MULTIPROC_DIR`` was set when it was imported)."""
    return bool(getattr(prometheus_client.values.ValueClass, "_multiprocess", False))


def _flushed(exporter: _Exporter) -> None:
    try:
        exporter.flush()
    except Exception:  # never fail a scrape or the flusher over one exporter
        _complaints.warn(
            log, "flush", time.monotonic(), "could not export stampede hits", exc_info=True
        )


def flush() -> None:
    """Add the hits every watched cache of this process counted since the last flush
    to its ``stampede_hits_total`` (and near hits) counters.

    Scrapes and, in multiprocess mode, a background thread call it; call it
    yourself before a worker ends with ``os._exit``.
    """
    with _flush_lock:
        for exporter in list(_everyone):
            _flushed(exporter)


def _keep_flushing() -> None:
    """Start the flushing thread of this process (multiprocess mode), once."""
    global _flusher, _exit_hooked
    with _flush_lock:
        if _flusher is not None and _flusher.is_alive():
            return
        _flusher = threading.Thread(target=_flush_loop, name="stampede-metrics", daemon=True)
        _flusher.start()
        hook, _exit_hooked = not _exit_hooked, True
    if hook:
        # Run by threading._shutdown: at interpreter exit and at the end of a
        # multiprocessing child (forked ones end with os._exit, skipping atexit).
        at_exit = getattr(threading, "_register_atexit", atexit.register)
        try:
            at_exit(flush)
        except RuntimeError:  # the interpreter is already shutting down
            atexit.register(flush)


def _flush_loop() -> None:
    # A daemon thread: nothing waits for it. The last flush is the exit hook's.
    while True:
        time.sleep(FLUSH_INTERVAL)
        flush()


def _before_fork() -> None:
    _flush_lock.acquire()


def _after_fork_in_parent() -> None:
    _flush_lock.release()


def _after_fork_in_child() -> None:
    """Fresh locks; in multiprocess mode the hits so far stay the parent's to export
    (the child's files start empty), and the child gets its own flushing thread."""
    global _flush_lock, _flusher
    _flush_lock = threading.Lock()
    rebase = _multiprocess()
    for exporter in list(_everyone):
        exporter.watched.forked(rebase)
    if _flusher is not None:
        _flusher = None  # the parent's thread does not exist here
        _keep_flushing()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
