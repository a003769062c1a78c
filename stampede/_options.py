"""A cache's options: written once, typed once, checked once.

``CacheOptions`` is the one typed list of the keyword options that
``CoalescingCache``, ``AsyncCoalescingCache`` and ``@cached`` accept (type
checkers read it through ``**options: Unpack[CacheOptions]``); ``Options``
is what a cache keeps of them once checked: plain attributes the hit path,
the leader and the policy read without looking anything up.
"""

from __future__ import annotations

import copy
import math
import random as _random
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypedDict, cast

from . import _policy
from ._policy import ErrorFilter
from ._stats import MetricsHook


class CacheOptions(TypedDict, total=False):
    """The keyword options of ``CoalescingCache``, ``AsyncCoalescingCache`` and ``@cached``.

    Every one is optional, and ``None`` means its default (given here).
    """

    # seconds a loaded value is fresh (60), or a function of the value giving them
    # (None or 0 from it: the value is not stored)
    ttl: float | Callable[[Any], float | None] | None
    beta: float | None  # XFetch eagerness; 0 turns early refresh off (1.0)
    stale_ttl: float | None  # seconds past ttl an expired value may still be served (0)
    cache_errors: type[BaseException] | tuple[type[BaseException], ...] | ErrorFilter | None
    error_ttl: float | None  # seconds a cached error lives; a failed refresh's backoff (5)
    wait_timeout: float | None  # the longest wait for another caller's load (None: no bound)
    cache_if: Callable[[Any], bool] | None  # false for a value: returned, not stored (all stored)
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

# The options that say how a cache treats a key's values, not what the cache is:
# a function decorated on a ready cache may set its own (DESIGN.md item 39).
POLICY_NAMES: frozenset[str] = frozenset(
    {"ttl", "stale_ttl", "beta", "cache_errors", "error_ttl", "wait_timeout", "cache_if"}
)

# What to do instead, for each option that defines the store itself.
_STORE_ADVICE = (
    "set it when the shared cache is made, or give this function a cache of its own "
    "(cache=<the client or URL> instead of the ready cache)"
)


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
        "ttl_of",
        "cache_if",
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

    ttl: float  # the fixed ttl (60 when ttl_of decides)
    ttl_of: Callable[[Any], float | None] | None  # ttl= as a function of the value
    cache_if: Callable[[Any], bool] | None  # is a loaded value stored?
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
        self._policy(get)
        self.lease_ttl = seconds("lease_ttl", get("lease_ttl", 10.0), positive=True)
        namespace = get("namespace", "")
        if not isinstance(namespace, str):
            raise TypeError(f"namespace must be a str, got {type(namespace).__name__}")
        try:
            namespace.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("namespace must be encodable as UTF-8 (no lone surrogates)") from None
        self.namespace = namespace
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

    def _policy(self, get: Callable[..., Any]) -> None:
        """Check and set the policy options (``POLICY_NAMES``) read through ``get``."""
        ttl = get("ttl", 60.0)
        self.ttl_of = None
        if callable(ttl):
            self.ttl_of, ttl = cast("Callable[[Any], float | None]", ttl), 60.0
        self.ttl = seconds("ttl", ttl, positive=True)
        cache_if = get("cache_if")
        if cache_if is not None and not callable(cache_if):
            raise TypeError(f"cache_if must be a function of the value, got {cache_if!r}")
        self.cache_if = cast("Callable[[Any], bool] | None", cache_if)
        self.beta = seconds("beta", get("beta", 1.0))
        self.stale_ttl = seconds("stale_ttl", get("stale_ttl", 0.0))
        self.error_ttl = seconds("error_ttl", get("error_ttl", 5.0))
        wait_timeout = get("wait_timeout")
        self.wait_timeout = (
            None if wait_timeout is None else seconds("wait_timeout", wait_timeout, positive=True)
        )
        cache_errors = get("cache_errors", ())
        self.cacheable = _policy.error_filter(cache_errors)
        self.error_types = _error_types(cache_errors)

    def with_policy(self, policy: Mapping[str, Any], *, where: str) -> Options:
        """These options with the policy options in ``policy`` replaced (``None``:
        kept as they are), for one function on a shared cache.

        Raises ``TypeError`` for an option that defines the store itself, saying
        what to do instead, or for an unknown name; ``ValueError`` out of range.
        """
        store = sorted(set(policy) & (OPTION_NAMES - POLICY_NAMES))
        if store:
            raise TypeError(
                f"{', '.join(store)} {'defines' if len(store) == 1 else 'define'} the shared "
                f"cache itself, not one function's use of it: {_STORE_ADVICE}. Per function "
                f"you may set: {', '.join(sorted(POLICY_NAMES))}"
            )
        unknown = sorted(set(policy) - POLICY_NAMES)
        if unknown:
            raise TypeError(
                f"{where}() got unexpected keyword argument(s): {', '.join(unknown)} "
                f"(options are: {', '.join(sorted(OPTION_NAMES))})"
            )
        view = copy.copy(self)
        ttl = self.ttl if self.ttl_of is None else self.ttl_of
        kept = {
            "ttl": ttl,
            "cache_if": self.cache_if,
            "beta": self.beta,
            "stale_ttl": self.stale_ttl,
            "error_ttl": self.error_ttl,
            "wait_timeout": self.wait_timeout,
        }

        def get(name: str, default: Any = None) -> Any:
            value = policy.get(name)
            if value is not None:
                return value
            if name == "cache_errors":
                return default  # the filter and types are copied below
            value = kept.get(name)
            return default if value is None else value

        view._policy(get)
        if policy.get("cache_errors") is None:
            view.cacheable, view.error_types = self.cacheable, self.error_types
        return view
