"""Warnings that repeat, collapsed to one line per interval, with a count.

During a store outage every concurrent caller fails the same way, and a
line each buries the log (a 100-caller burst used to write 103 of them). A
``Throttle`` writes the first warning of a kind at once, then only counts
the ones that follow within ``interval`` seconds (each still goes to DEBUG),
and tells that count on the next line it writes for the kind::

    store read failed, loading without it: Redis failed: ... (37 more in the last 12 s)

The count is of the warnings held back since the previous line of the same
kind, and the seconds are the time since that line. Time comes from the
caller (``now``), so a cache's injected clock drives it in tests.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable
from typing import Any


class _Kind:
    """One kind of warning: when its last line was written, and how many held back since."""

    __slots__ = ("logged_at", "held")

    def __init__(self, now: float) -> None:
        self.logged_at = now
        self.held = 0


class Throttle:
    """One line per ``interval`` seconds for each kind of warning (see the module docstring).

    ``max_kinds`` bounds the memory: beyond it the oldest kind is forgotten
    (its next warning is written at once, as a first one).
    """

    def __init__(self, interval: float, *, max_kinds: int = 1024) -> None:
        if interval < 0 or max_kinds < 1:
            raise ValueError("interval must be >= 0 and max_kinds >= 1")
        self.interval = interval
        self._max_kinds = max_kinds
        self._lock = threading.Lock()  # guards _kinds; never held while logging
        self._kinds: dict[Hashable, _Kind] = {}

    def warn(
        self,
        logger: logging.Logger,
        kind: Hashable,
        now: float,
        msg: str,
        *args: object,
        exc_info: Any = None,
    ) -> bool:
        """Log ``msg % args`` at WARNING unless a line of ``kind`` was written less
        than ``interval`` seconds before ``now``; then at DEBUG. True when written."""
        held, since = 0, now
        with self._lock:
            state = self._kinds.get(kind)
            if state is None:
                if len(self._kinds) >= self._max_kinds:
                    self._kinds.pop(next(iter(self._kinds)), None)
                self._kinds[kind] = _Kind(now)
            elif 0 <= now - state.logged_at < self.interval:  # (a clock gone back: log)
                state.held += 1
                held = -1
            else:
                held, since = state.held, state.logged_at
                state.held, state.logged_at = 0, now
        if held < 0:
            logger.debug(msg, *args, stacklevel=2)  # the record names our caller
            return False
        if held:
            msg += " (%d more in the last %.0f s)"
            args = (*args, held, now - since)
        logger.warning(msg, *args, exc_info=exc_info, stacklevel=2)
        return True

    def clear(self) -> None:
        """Forget every kind: each next warning is written as a first one."""
        with self._lock:
            self._kinds.clear()
