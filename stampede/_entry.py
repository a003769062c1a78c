"""The entry envelope: a cached value or a cached error, with its timing.

One ``Entry`` is what a backend stores under a key. Times are on the clock of
the cache that wrote it (``time.monotonic`` by default) so entries held in
process memory never compare wall clocks. Byte-oriented backends encode the
same fields with ``ENVELOPE_VERSION``; an entry of an unknown version is a miss.

``check_at`` is when the early refresh of the value becomes due (XFetch, see
``_policy.refresh_point``); before it, a read is a plain hit: the hit path is
one comparison. Negative entries set it to ``-inf`` so every read of them
takes the slow path and raises.
"""

from __future__ import annotations

import builtins
import enum
import math
from typing import Any, Generic, TypeVar

ENVELOPE_VERSION = 1

# XFetch draws u in (0, 1]; -ln(u) is clamped at XFETCH_CAP (u = 0 would be
# infinite): an early refresh never starts more than delta * (1 + beta * 20)
# before expiry. The chance of a draw reaching the cap is e**-20, about 2e-9.
XFETCH_CAP = 20.0

# However early the draw says, a value is never refreshed before this share of
# its ttl has passed: a load slower than the ttl must not refresh in a loop.
MIN_FRESH_SHARE = 0.5

V = TypeVar("V")


class Missing(enum.Enum):
    """Sentinel type: ``MISSING`` means "no value", so ``None`` can be cached."""

    MISSING = "MISSING"

    def __repr__(self) -> str:
        return "MISSING"


MISSING = Missing.MISSING


class ErrorData:
    """A negative-cached error as data: its type and its ``args``, never the instance."""

    __slots__ = ("type", "args")

    def __init__(self, type: type[Exception], args: tuple[Any, ...]) -> None:
        self.type: builtins.type[Exception] = type
        self.args: tuple[Any, ...] = args

    @classmethod
    def of(cls, exc: Exception) -> ErrorData:
        return cls(type(exc), tuple(exc.args))

    def rebuild(self) -> Exception:
        """A new instance of the cached type (a fresh object for every raise)."""
        try:
            exc = self.type(*self.args)
            if exc.args == self.args:
                return exc
        except Exception:
            pass
        # The type's __init__ wants other arguments than its args, or reshapes
        # them: build it bare, so `except ThatType:` still works and the
        # message is the original one (attributes set by __init__ are lost).
        exc = self.type.__new__(self.type)
        exc.args = self.args
        return exc

    def rebuildable(self) -> bool:
        """Can ``rebuild`` make one? (``ExceptionGroup`` and friends may refuse.)"""
        try:
            self.rebuild()
        except Exception:
            return False
        return True

    def __repr__(self) -> str:
        return f"ErrorData({self.type.__qualname__}, {self.args!r})"


class Entry(Generic[V]):
    """What a backend stores for one key: a value or an error, and its timing."""

    __slots__ = (
        "value",
        "error",
        "fresh_until",
        "stale_until",
        "delta",
        "check_at",
        "retry_at",
    )

    value: V | Missing
    error: ErrorData | None
    fresh_until: float  # fresh (served with no refresh) before this instant
    stale_until: float  # may be served stale before this instant
    delta: float  # seconds the load that produced the value took
    check_at: float  # before this, a read is a plain hit (no XFetch draw)
    retry_at: float  # no refresh starts before this (backoff after a failed refresh)

    def __init__(
        self,
        value: V | Missing,
        error: ErrorData | None,
        fresh_until: float,
        stale_until: float,
        delta: float,
        check_at: float,
        retry_at: float = -math.inf,
    ) -> None:
        self.value = value
        self.error = error
        self.fresh_until = fresh_until
        self.stale_until = stale_until
        self.delta = delta
        self.check_at = check_at
        self.retry_at = retry_at

    def with_retry_at(self, retry_at: float) -> Entry[V]:
        """The same entry, refreshing no sooner than ``retry_at``."""
        return Entry(
            self.value,
            self.error,
            self.fresh_until,
            self.stale_until,
            self.delta,
            self.check_at,
            retry_at,
        )

    def __repr__(self) -> str:
        what = f"error={self.error!r}" if self.error is not None else f"value={self.value!r}"
        return (
            f"Entry({what}, fresh_until={self.fresh_until:.6f}, "
            f"stale_until={self.stale_until:.6f}, delta={self.delta:.6f})"
        )


def refresh_point(now: float, ttl: float, delta: float, beta: float, u: float) -> float:
    """When the early refresh of a value written at ``now`` becomes due.

    The XFetch rule (Vattani et al., VLDB 2015) refreshes when
    ``t - delta * beta * ln(u) >= expiry``. stampede draws ``u`` once per
    stored value rather than once per read: with single-flight there is one
    refresh per key anyway, and a per-read draw makes the refresh come earlier
    the more often a key is read (at 10,000 reads/s, 0.7 s early for a 100 ms
    load), which multiplies loads. The point is moved ``delta`` earlier still,
    so the refresh, which takes about ``delta``, is done by expiry and no
    reader waits. ``beta <= 0`` turns early refresh off.
    """
    expiry = now + ttl
    if beta <= 0.0:
        return expiry
    if not u > _MIN_U:  # also catches NaN
        u = _MIN_U
    elif u > 1.0:
        u = 1.0
    lead = delta * (1.0 + beta * -math.log(u))
    if lead != lead:  # 0 * inf: no load time, so no head start
        lead = 0.0
    return max(expiry - lead, now + ttl * MIN_FRESH_SHARE)


_MIN_U = math.exp(-XFETCH_CAP)


def value_entry(
    value: V, now: float, ttl: float, stale_ttl: float, delta: float, beta: float, u: float
) -> Entry[V]:
    """A value entry written at ``now`` by a load that took ``delta`` seconds.

    ``u`` is the XFetch draw for this value, uniform in (0, 1].
    """
    fresh_until = now + ttl
    check_at = refresh_point(now, ttl, delta, beta, u)
    return Entry(value, None, fresh_until, fresh_until + stale_ttl, delta, check_at)


def error_entry(exc: Exception, now: float, error_ttl: float) -> Entry[Any]:
    """A negative entry for ``exc``, raised again to readers for ``error_ttl`` seconds."""
    until = now + error_ttl
    return Entry(MISSING, ErrorData.of(exc), until, until, 0.0, -math.inf)
