"""What a failing store means: the rules for reads and writes, in one place.

By default a cache fails open: a read that fails is a miss (counted,
logged) and the value loads through the single-flight; a write that fails
leaves the value uncached but still returned. With
``on_backend_error="raise"`` a ``BackendUnavailable`` is raised instead.
Unreadable bytes (``CorruptEntry``) are always a counted miss, never an
error. Every entry point (the hit path, the leader's second look, the lease
read, ``get``) goes through ``read_failed``; every commit through
``write_failed``.
"""

from __future__ import annotations

import logging

from ._envelope import CorruptEntry
from ._errors import BackendUnavailable, SerializationError
from ._stats import Recorder
from .backends._shared import CircuitOpen, StoreBusy, ValueTooLarge

log = logging.getLogger("stampede")

# Why values could not be serialized, each warned about once (the reason names the
# type): a function returning an unregistered class would otherwise log on every
# call. Bounded, in case the reasons vary without end.
_warned: dict[str, None] = {}
_WARNED_MAX = 1024


def _first_time(reason: str) -> bool:
    if reason in _warned:
        return False
    if len(_warned) >= _WARNED_MAX:
        _warned.pop(next(iter(_warned)), None)
    _warned[reason] = None
    return True


def read_failed(
    exc: Exception, *, local: bool, raise_backend_errors: bool, rec: Recorder, count: bool = True
) -> None:
    """A failed store read is a miss (returns None), or raises when configured to.

    ``local``: the store is a user's mapping in this process, whose own
    errors are a counted miss too; a ``TypeError`` there is an unhashable
    key, the caller's mistake, and is raised. ``count=False``: a read whose
    failure was already counted (a leader's second look at a foreign object).
    """
    if isinstance(exc, CorruptEntry):
        if count:
            rec.count("serialization_errors")
            log.warning("unreadable entry in the store, treated as a miss: %s", exc)
        return None
    if isinstance(exc, BackendUnavailable):
        rec.count("backend_errors")
        if raise_backend_errors:
            raise exc
        if isinstance(exc, (CircuitOpen, StoreBusy)):
            log.debug("%s", exc)
        else:
            log.warning("store read failed, loading without it: %s", exc)
        return None
    if local and not isinstance(exc, TypeError):
        rec.count("backend_errors")
        log.warning("store read failed; treating it as a miss", exc_info=True)
        return None
    raise exc


def write_failed(exc: Exception, *, raise_backend_errors: bool, rec: Recorder) -> None:
    """A value that could not be stored is still returned: count and log why (or raise)."""
    if isinstance(exc, ValueTooLarge):
        rec.count("serialization_errors")
        log.warning("%s", exc)
        return
    if isinstance(exc, SerializationError):
        rec.count("serialization_errors")
        if _first_time(str(exc)):
            log.warning(
                "%s. The value is returned to its callers, not cached; this warning is "
                "given once per process (serialization_errors counts every time)",
                exc,
            )
        else:
            log.debug("%s (not cached)", exc)
        return
    rec.count("backend_errors")
    if isinstance(exc, BackendUnavailable):
        if raise_backend_errors:
            raise exc
        if not isinstance(exc, CircuitOpen):
            log.warning("store write failed; the value is returned, not cached: %s", exc)
        return
    log.warning("store write failed; the value is returned, not cached", exc_info=exc)
