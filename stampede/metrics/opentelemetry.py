"""OpenTelemetry metrics for stampede caches, with opentelemetry-api only.

Wiring (after the application has set its ``MeterProvider``)::

    from stampede import CoalescingCache, cached
    from stampede.metrics.opentelemetry import OpenTelemetryMetrics

    metrics = OpenTelemetryMetrics()  # meter "stampede" of the global provider
    users = CoalescingCache(ttl=60, name="users", metrics=metrics)
    metrics.watch(users)  # its hits are read from its counters at collection time

    @cached(ttl=60, metrics=metrics)  # its cache is named after the function
    def price(sku: str) -> int: ...

    metrics.watch(price)  # a @cached function: its .cache is watched

Instruments, with the default ``prefix="stampede"``, each measurement with
the attribute ``cache`` (the cache's ``name``):

- ``stampede.<event>``: one counter per event of the hook, named after the
  ``Stats`` field it mirrors: ``misses``, ``loads``, ``load_errors``,
  ``not_stored``, ``coalesced``, ``early_refreshes``, ``stale_served``,
  ``negative_hits``, ``fenced``, ``lease_waits``, ``lease_takeovers``,
  ``backend_errors``, ``serialization_errors``, ``breaker_opened``,
  ``breaker_closed``.
- ``stampede.hits``: an observable counter of the hits of the caches passed
  to ``watch()``, read from their counters at collection time (caches of one
  name summed; a cache garbage-collected leaves the sum, which a backend reads
  as a reset); ``stampede.near_hits`` the same for those served from the near
  cache. Each process reports its own: the collector or the backend adds
  up the processes.
- ``stampede.load.duration`` (unit ``s``, attribute ``outcome``: ``"ok"`` or
  ``"error"``): time in loader calls, a histogram.
- ``stampede.wait.duration`` (unit ``s``): time callers waited for another
  caller's load, a histogram.

The histograms advise bucket bounds in seconds (opentelemetry-api 1.23 and
later); a view in the SDK can override them.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Iterable

from .. import __version__
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
    from opentelemetry import metrics as otel_metrics
    from opentelemetry.metrics import (
        CallbackOptions,
        Counter,
        Histogram,
        Meter,
        MeterProvider,
        Observation,
    )
except ImportError as _exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "OpenTelemetryMetrics needs opentelemetry-api: pip install 'stampede[opentelemetry]'"
    ) from _exc

__all__ = ["DEFAULT_BUCKETS", "OpenTelemetryMetrics"]

SCOPE = "stampede"

# The instrument name syntax; the longest suffix, ".serialization_errors", fits in its 255.
_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9_./-]{0,233}")


class OpenTelemetryMetrics(Adapter):
    """A ``MetricsHook`` that records a cache's events on OpenTelemetry instruments.

    Instances on the same meter and prefix share their instruments and their
    watch list (the SDK keeps only the first callback given to an instrument
    name, so a second watch list would never be read).

    Args:
        meter: the meter to create the instruments on. Default: the meter
            ``"stampede"`` of ``meter_provider``.
        meter_provider: where to get that meter. Default: the global provider
            (instances made before it is set forward to it once it is).
        prefix: the first part of every instrument name.

    Raises:
        TypeError: both ``meter`` and ``meter_provider`` are given.
        ValueError: the prefix would not make valid instrument names.
    """

    def __init__(
        self,
        meter: Meter | None = None,
        *,
        meter_provider: MeterProvider | None = None,
        prefix: str = "stampede",
    ) -> None:
        if meter is not None and meter_provider is not None:
            raise TypeError("pass meter= or meter_provider=, not both")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        if not _PREFIX.fullmatch(prefix):
            raise ValueError(f"prefix must match {_PREFIX.pattern}, got {prefix!r}")
        self._prefix = prefix
        self._sink = _instruments_for(meter, meter_provider, prefix)


# Instruments by meter and prefix. They hold no reference to their meter, so a
# meter that goes away takes its entry with it. The global provider's meter is
# taken once: a proxy meter made before the provider is set forwards to it.
_by_meter: weakref.WeakKeyDictionary[Meter, dict[str, _Instruments]] = weakref.WeakKeyDictionary()
_global: dict[str, _Instruments] = {}
_lock = threading.Lock()


def _instruments_for(
    meter: Meter | None, meter_provider: MeterProvider | None, prefix: str
) -> _Instruments:
    with _lock:
        if meter is None and meter_provider is None:
            found = _global.get(prefix)
            if found is None:
                found = _global[prefix] = _Instruments(
                    otel_metrics.get_meter(SCOPE, __version__), prefix
                )
            return found
        if meter is None:
            meter = otel_metrics.get_meter(SCOPE, __version__, meter_provider=meter_provider)
        try:
            per_prefix = _by_meter.setdefault(meter, {})
        except TypeError:  # a meter that cannot be weakly referenced: not shared
            return _Instruments(meter, prefix)
        found = per_prefix.get(prefix)
        if found is None:
            found = per_prefix[prefix] = _Instruments(meter, prefix)
        return found


class _Instruments:
    """The instruments of one meter and prefix, and the caches whose hits they observe."""

    def __init__(self, meter: Meter, prefix: str) -> None:
        self.watched = Watched()
        self._counters: dict[str, Counter] = {
            event: meter.create_counter(f"{prefix}.{event}", description=describe(event))
            for event in EVENTS
        }
        self._load = _histogram(
            meter, f"{prefix}.load.duration", "Time spent in loader calls, by outcome."
        )
        self._wait = _histogram(
            meter,
            f"{prefix}.wait.duration",
            "Time callers waited for another caller's load or another process's lease.",
        )
        meter.create_observable_counter(
            f"{prefix}.hits", callbacks=[self._observe_hits], description=describe("hits")
        )
        meter.create_observable_counter(
            f"{prefix}.near_hits",
            callbacks=[self._observe_near_hits],
            description=describe("near_hits"),
        )

    def record(self, cache: str, event: str, duration: float | None) -> None:
        counter = self._counters.get(event)
        if counter is None:
            return  # not a Stats counter: nothing of ours to bump
        attributes = {"cache": cache}
        counter.add(1, attributes)
        if duration is None:
            return
        outcome = LOAD_OUTCOMES.get(event)
        if outcome is not None:
            self._load.record(max(duration, 0.0), {"cache": cache, "outcome": outcome})
        elif event in WAITS:
            self._wait.record(max(duration, 0.0), attributes)

    def _observe_hits(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(hits, {"cache": name}) for name, hits in self.watched.hits().items()]

    def _observe_near_hits(self, options: CallbackOptions) -> Iterable[Observation]:
        watched = self.watched.hits("near_hits")
        return [Observation(hits, {"cache": name}) for name, hits in watched.items()]


def _histogram(meter: Meter, name: str, description: str) -> Histogram:
    try:
        return meter.create_histogram(
            name,
            unit="s",
            description=description,
            explicit_bucket_boundaries_advisory=DEFAULT_BUCKETS,
        )
    except TypeError:  # opentelemetry-api before 1.23: no advisory
        return meter.create_histogram(name, unit="s", description=description)
