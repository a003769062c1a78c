"""Metrics hooks for Prometheus and OpenTelemetry.

Each adapter lives in its own module and imports its library only when that
module is imported, so ``import stampede.metrics`` needs neither:

- ``stampede.metrics.prometheus.PrometheusMetrics`` (``pip install 'stampede[prometheus]'``)
- ``stampede.metrics.opentelemetry.OpenTelemetryMetrics``
  (``pip install 'stampede[opentelemetry]'``)

Both are also reachable here (``from stampede.metrics import PrometheusMetrics``),
imported on first access. Pass one as ``metrics=`` to a cache or to
``@cached``, and ``watch()`` the cache to export its hits, which never reach
the hook.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .opentelemetry import OpenTelemetryMetrics
    from .prometheus import PrometheusMetrics

__all__ = ["OpenTelemetryMetrics", "PrometheusMetrics"]


def __getattr__(name: str) -> Any:  # the adapters load their library lazily
    if name == "PrometheusMetrics":
        from .prometheus import PrometheusMetrics

        return PrometheusMetrics
    if name == "OpenTelemetryMetrics":
        from .opentelemetry import OpenTelemetryMetrics

        return OpenTelemetryMetrics
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
