"""A cache's options: written once, typed once, checked once.

``CacheOptions`` is the one typed list of the keyword options that
``CoalescingCache``, ``AsyncCoalescingCache`` and ``@cached`` accept (type
checkers read it through ``**options: Unpack[CacheOptions]``); ``Options``
is what a cache keeps of them once checked: plain attributes the hit path,
the leader and the policy read without looking anything up.
"""

from __future__ import annotations

import math
import random as _random
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypedDict

from . import _policy
from ._policy import ErrorFilter
from ._stats import MetricsHook


class CacheOptions(TypedDict, total=False):
    """The keyword options of ``CoalescingCache``, ``AsyncCoalescingCache`` and ``@cached``.

    Every one is optional, and ``None`` means its default (given here).
    """

    ttl: float | None  # seconds a loaded value is fresh (60)
    beta: float | None  # XFetch eagerness; 0 turns early refresh off (1.0)
    stale_ttl: float | None  # seconds past ttl an expired value may still be served (0)
    cache_errors: type[BaseException] | tuple[type[BaseException], ...] | ErrorFilter | None
    error_ttl: float | None  # seconds a cached error lives; a failed refresh's backoff (5)
    wait_timeout: float | None  # the longest wait for another caller's load (None: no bound)
    namespace: str | None  # key prefix in a shared store, and the scope of clear() ("")
    serializer: Any  # how shared stores encode values (DataSerializer)
    distributed: bool | None  # single-flight across processes through the store (False)
    lease_ttl: float | None  # seconds a lease lives unrenewed (10)
    maxsize: int | None  # entries of the default in-process LRU (4096)
    near_maxsize: int | None  # near copies of a shared store's entries kept here (0: off)
    near_ttl: float | None  # the most seconds a near copy is served after its read (5)
    name: str | None  # the cache's name for the metrics hook (the namespace, or "default")
    metrics: MetricsHook | None  # told of misses, loads, waits, errors (none)
    on_backend_error: Literal["fail-open", "raise"] | None  # a failing store's effect (fail-open)
    clock: Callable[[], float] | None  # monotonic seconds (time.monotonic); tests pass a fake
    random: Callable[[], float] | None  # uniform draws in [0, 1) for XFetch (random.random)


OPTION_NAMES: frozenset[str] = frozenset(CacheOptions.__annotations__)


def seconds(name: str, value: float, *, positive: bool = False) -> float:
    """``value`` as a finite number of seconds (``> 0`` when ``positive``), or a clear error."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}") from None
    if math.isnan(value) or value < 0 or (positive and value == 0) or math.isinf(value):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
    return value


def _error_types(cache_errors: object) -> tuple[type[BaseException], ...]:
    """The exception types a negative entry read from a shared store may be rebuilt as."""
    if isinstance(cache_errors, type):
        return (cache_errors,)
    if isinstance(cache_errors, tuple):
        return cache_errors
    return ()  # a predicate names no types: negative entries stay in this process's reads


class Options:
    """The checked options of one cache (read-only by convention)."""

    __slots__ = (
        "ttl",
        "beta",
        "stale_ttl",
        "error_ttl",
        "wait_timeout",
        "lease_ttl",
        "namespace",
        "cacheable",
        "error_types",
        "raise_backend_errors",
        "distributed",
        "serializer",
        "maxsize",
        "near_maxsize",
        "near_ttl",
        "name",
        "metrics",
        "clock",
        "random",
    )

    ttl: float
    beta: float
    stale_ttl: float
    error_ttl: float
    wait_timeout: float | None
    lease_ttl: float
    namespace: str
    cacheable: ErrorFilter  # is this loader error negative-cached?
    error_types: tuple[type[BaseException], ...]  # types a shared store's reader rebuilds
    raise_backend_errors: bool
    distributed: bool
    serializer: Any
    maxsize: int | None
    near_maxsize: int
    near_ttl: float
    name: str
    metrics: MetricsHook | None
    clock: Callable[[], float]
    random: Callable[[], float]

    @classmethod
    def parse(cls, options: Mapping[str, Any], *, where: str = "CoalescingCache") -> Options:
        """Check ``options`` (names, types, ranges) and fill in the defaults.

        Raises ``TypeError`` for an unknown name or a value of the wrong type,
        ``ValueError`` for a value out of range.
        """
        unknown = sorted(set(options) - OPTION_NAMES)
        if unknown:
            raise TypeError(
                f"{where}() got unexpected keyword argument(s): {', '.join(unknown)} "
                f"(options are: {', '.join(sorted(OPTION_NAMES))})"
            )
        def get(name: str, default: Any = None) -> Any:
            value = options.get(name)
            return default if value is None else value  # None: the default

        self = cls()
        self.ttl = seconds("ttl", get("ttl", 60.0), positive=True)
        self.beta = seconds("beta", get("beta", 1.0))
        self.stale_ttl = seconds("stale_ttl", get("stale_ttl", 0.0))
        self.error_ttl = seconds("error_ttl", get("error_ttl", 5.0))
        wait_timeout = get("wait_timeout")
        self.wait_timeout = (
            None if wait_timeout is None else seconds("wait_timeout", wait_timeout, positive=True)
        )
        self.lease_ttl = seconds("lease_ttl", get("lease_ttl", 10.0), positive=True)
        namespace = get("namespace", "")
        if not isinstance(namespace, str):
            raise TypeError(f"namespace must be a str, got {type(namespace).__name__}")
        try:
            namespace.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("namespace must be encodable as UTF-8 (no lone surrogates)") from None
        self.namespace = namespace
        cache_errors = get("cache_errors", ())
        self.cacheable = _policy.error_filter(cache_errors)
        self.error_types = _error_types(cache_errors)
        on_backend_error = get("on_backend_error", "fail-open")
        if on_backend_error not in ("fail-open", "raise"):
            raise ValueError(
                f"on_backend_error must be 'fail-open' or 'raise', got {on_backend_error!r}"
            )
        self.raise_backend_errors = on_backend_error == "raise"
        self.distributed = bool(get("distributed", False))
        self.serializer = get("serializer")
        self.maxsize = get("maxsize")
        near_maxsize = get("near_maxsize", 0)
        if isinstance(near_maxsize, bool) or not isinstance(near_maxsize, int):
            raise TypeError(f"near_maxsize must be an int, got {type(near_maxsize).__name__}")
        if near_maxsize < 0:
            raise ValueError(f"near_maxsize must be >= 0 (0: no near cache), got {near_maxsize}")
        self.near_maxsize = near_maxsize
        self.near_ttl = seconds("near_ttl", get("near_ttl", 5.0), positive=True)
        self.metrics = get("metrics")
        self.name = get("name") or namespace or "default"
        self.clock = get("clock", time.monotonic)
        self.random = get("random", _random.random)
        return self
