"""What a failing store means: the rules for reads and writes, in one place.

By default a cache fails open: a read that fails is a miss (counted,
logged) and the value loads through the single-flight; a write that fails
leaves the value uncached but still returned. With
``on_backend_error="raise"`` a ``BackendUnavailable`` is raised instead.
Unreadable bytes (``CorruptEntry``) are always a counted miss, never an
error. Every entry point (the hit path, the leader's second look, the lease
read, ``get``) goes through ``read_failed``; every commit through
``write_failed``.

The warnings are collapsed (``_throttle``): during an outage every caller
fails alike, so each store writes one line per ``OUTAGE_INTERVAL`` and kind
of failure, with the count of the ones held back; a value that cannot be
stored is warned about once per ``UNSTORABLE_INTERVAL`` and reason. The
counters still count every one.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable

from ._envelope import CorruptEntry
from ._errors import BackendUnavailable, SerializationError
from ._stats import Recorder
from ._throttle import Throttle
from .backends._shared import CircuitOpen, StoreBusy, ValueTooLarge

log = logging.getLogger("stampede")

OUTAGE_INTERVAL = 10.0  # seconds between two lines of one store and kind of failure
UNSTORABLE_INTERVAL = 60.0  # seconds between two lines of one reason a value is not stored

# Values that could not be serialized, by reason (the reason names the type): a
# function returning an unregistered class would otherwise log on every call.
# (The tests' fixture clears it between tests.)
_warned = Throttle(UNSTORABLE_INTERVAL)

# Store failures, a throttle per store: its breaker (shared by every cache on the
# store), or the store itself (an in-process mapping's view). Weakly held, so a
# store made anew never inherits a dead one's quiet period.
_outages: weakref.WeakKeyDictionary[object, Throttle] = weakref.WeakKeyDictionary()
_outages_lock = threading.Lock()
_unkeyed = Throttle(OUTAGE_INTERVAL)  # stores that cannot be weakly referenced


def _throttle_of(store: object) -> Throttle:
    owner = getattr(store, "breaker", None) or store
    with _outages_lock:
        try:
            found = _outages.get(owner)
            if found is None:
                found = _outages[owner] = Throttle(OUTAGE_INTERVAL)
        except TypeError:  # not hashable, or not weakly referenceable
            return _unkeyed
        return found


def _fix_for(reason: str, store: object) -> str:
    """What to do about a value the serializer refused, unless its reason says already."""
    if "Serializer(" in reason:
        return ""  # DataSerializer's reasons name the registration, or the signed pickle
    serializer = getattr(getattr(store, "codec", None), "serializer", None)
    name = getattr(serializer, "name", None)
    if isinstance(name, str) and name.startswith("pickle"):
        return "; return a picklable value, or keep such values out with cache_if="
    return (
        "; to cache such values pass a serializer= that stores them (DataSerializer(types=[...])"
        " for your enums, dataclasses, attrs classes and pydantic models, or "
        "PickleSerializer(secret=...)), or keep them out with cache_if="
    )


def read_failed(
    exc: Exception,
    *,
    local: bool,
    raise_backend_errors: bool,
    rec: Recorder,
    count: bool = True,
    store: object = None,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """A failed store read is a miss (returns None), or raises when configured to.

    ``local``: the store is a user's mapping in this process, whose own
    errors are a counted miss too; a ``TypeError`` there is an unhashable
    key, the caller's mistake, and is raised. ``count=False``: a read whose
    failure was already counted (a leader's second look at a foreign object).
    ``store`` and ``clock``: whose warnings are collapsed, and on what time.
    """
    if isinstance(exc, CorruptEntry):
        if count:
            rec.count("serialization_errors")
            _throttle_of(store).warn(
                log,
                "unreadable",
                clock(),
                "unreadable entry in the store, treated as a miss: %s",
                exc,
            )
        return None
    if isinstance(exc, BackendUnavailable):
        rec.count("backend_errors")
        if raise_backend_errors:
            raise exc
        if isinstance(exc, (CircuitOpen, StoreBusy)):
            log.debug("%s", exc)
        else:
            _throttle_of(store).warn(
                log, "read", clock(), "store read failed, loading without it: %s", exc
            )
        return None
    if local and not isinstance(exc, TypeError):
        rec.count("backend_errors")
        _throttle_of(store).warn(
            log, "read", clock(), "store read failed; treating it as a miss", exc_info=exc
        )
        return None
    raise exc


def write_failed(
    exc: Exception,
    *,
    raise_backend_errors: bool,
    rec: Recorder,
    store: object = None,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """A value that could not be stored is still returned: count and log why (or raise)."""
    if isinstance(exc, ValueTooLarge):
        rec.count("serialization_errors")
        _throttle_of(store).warn(
            log,
            "too large",
            clock(),
            "%s (cache %r); raise the store's max_value_size= to cache such values",
            exc,
            rec.name,
        )
        return
    if isinstance(exc, SerializationError):
        rec.count("serialization_errors")
        reason = str(exc)
        _warned.warn(
            log,
            reason,
            clock(),
            "%s%s. The value is returned to its callers, not cached (cache %r); "
            "serialization_errors counts each one",
            reason,
            _fix_for(reason, store),
            rec.name,
        )
        return
    rec.count("backend_errors")
    if isinstance(exc, BackendUnavailable):
        if raise_backend_errors:
            raise exc
        if not isinstance(exc, CircuitOpen):
            _throttle_of(store).warn(
                log,
                "write",
                clock(),
                "store write failed; the value is returned, not cached: %s",
                exc,
            )
        return
    _throttle_of(store).warn(
        log,
        "write",
        clock(),
        "store write failed; the value is returned, not cached",
        exc_info=exc,
    )
