"""Pure decisions: what a read of an entry means, and what a failed load leaves behind.

Nothing here does I/O, reads a clock or draws a random number: the callers
pass ``now`` and the draw ``u`` in, so the sync and async caches share every
decision and the tests can pin each one.

Early refresh (XFetch) is decided when a value is stored: the entry's
``check_at`` is its refresh point (``_entry.refresh_point``), so a read only
compares ``now`` with it and never draws.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from ._entry import Entry
from ._errors import StampedeError


class Decision(enum.IntEnum):
    HIT = 0  # serve the value
    REFRESH = 1  # serve the value, start one background refresh (XFetch)
    STALE = 2  # serve the expired value, start one background refresh
    STALE_QUIET = 3  # serve the expired value; a refresh failed recently, back off
    NEGATIVE = 4  # raise the cached error
    MISS = 5  # load in the foreground


def decide(entry: Entry[Any] | None, now: float) -> Decision:
    """Classify a read of ``entry`` at ``now``."""
    if entry is None:
        return Decision.MISS
    if entry.error is not None:
        return Decision.NEGATIVE if now < entry.fresh_until else Decision.MISS
    if now < entry.fresh_until:
        if now < entry.check_at or now < entry.retry_at:
            return Decision.HIT
        return Decision.REFRESH
    if now < entry.stale_until:
        return Decision.STALE_QUIET if now < entry.retry_at else Decision.STALE
    return Decision.MISS


def usable(entry: Entry[Any] | None, now: float) -> bool:
    """Does ``entry`` hold a value that may still be served (fresh or stale)?"""
    return entry is not None and entry.error is None and now < entry.stale_until


ErrorFilter = Callable[[BaseException], bool]


def error_filter(
    cache_errors: type[BaseException] | tuple[type[BaseException], ...] | ErrorFilter,
) -> ErrorFilter:
    """Turn ``cache_errors`` (types or a predicate) into one predicate.

    Never true for what must not be negative-cached whatever the user lists:
    ``BaseException``s that are not ``Exception``s (cancellation, exit,
    interrupts), timeouts, and stampede's own errors (backend failures, waits).
    """
    predicate: ErrorFilter
    if callable(cache_errors) and not isinstance(cache_errors, (type, tuple)):
        predicate = cache_errors
    else:
        # A lone type is callable too, but it is no predicate.
        types = (cache_errors,) if isinstance(cache_errors, type) else tuple(cache_errors)
        for t in types:
            if not (isinstance(t, type) and issubclass(t, BaseException)):
                raise TypeError(f"cache_errors must hold exception types, got {t!r}")

        def of_types(exc: BaseException) -> bool:
            return isinstance(exc, types)

        predicate = of_types

    def cacheable(exc: BaseException) -> bool:
        if not isinstance(exc, Exception) or isinstance(exc, (TimeoutError, StampedeError)):
            return False
        return bool(predicate(exc))

    return cacheable


class Outcome(enum.IntEnum):
    """What a load that raised leaves in the cache."""

    RAISE = 0  # share the error with the waiting callers; cache nothing
    NEGATIVE = 1  # store a negative entry, then raise
    SERVE_STALE = 2  # serve the previous value instead (stale-if-error), back off


def on_load_error(
    exc: BaseException, previous: Entry[Any] | None, now: float, cacheable: ErrorFilter
) -> Outcome:
    """Decide what a failed load does; a usable old value always beats an error."""
    if not isinstance(exc, Exception):
        return Outcome.RAISE
    if usable(previous, now):
        return Outcome.SERVE_STALE
    if cacheable(exc):
        return Outcome.NEGATIVE
    return Outcome.RAISE
