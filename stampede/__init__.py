"""stampede: cache-stampede protection for the caches you already use.

Misses of a key load once for every concurrent caller (single-flight), hot
keys refresh before they expire (XFetch), errors can be negative-cached, and
stale values can be served while revalidating or when the origin fails.
"""

from __future__ import annotations

from ._acache import AsyncCoalescingCache
from ._binding import bind, deferred
from ._cache import CoalescingCache
from ._cached_many import AsyncCachedManyFunction, CachedManyFunction, cached_many
from ._decorator import AsyncCachedFunction, CachedFunction, CacheInfo, cached
from ._entry import MISSING
from ._errors import (
    BackendUnavailable,
    BlockingWaitInLoop,
    IdempotencyError,
    InFlight,
    KeyReused,
    LoadAbandoned,
    LoadTimeout,
    RecursiveLoad,
    ReplayUnavailable,
    SerializationError,
    StampedeError,
)
from ._idempotency import AsyncIdempotency, Idempotency
from ._singleflight import AsyncSingleFlight, SingleFlight
from ._stats import LoggingMetrics, MetricsHook, Stats

__version__ = "0.1.0"

__all__ = [
    "MISSING",
    "AsyncCachedFunction",
    "AsyncCachedManyFunction",
    "AsyncCoalescingCache",
    "AsyncIdempotency",
    "AsyncSingleFlight",
    "BackendUnavailable",
    "BlockingWaitInLoop",
    "CacheInfo",
    "CachedFunction",
    "CachedManyFunction",
    "CoalescingCache",
    "Idempotency",
    "IdempotencyError",
    "InFlight",
    "KeyReused",
    "LoadAbandoned",
    "LoadTimeout",
    "LoggingMetrics",
    "MetricsHook",
    "RecursiveLoad",
    "ReplayUnavailable",
    "SerializationError",
    "SingleFlight",
    "StampedeError",
    "Stats",
    "__version__",
    "bind",
    "cached",
    "cached_many",
    "deferred",
]
