"""A circuit breaker for a shared store.

After ``threshold`` failures in a row the circuit opens: for ``cooldown``
seconds every operation fails at once, without paying a connect timeout.
Then one operation at a time is let through as a probe; a success closes the
circuit, a failure opens it for another ``cooldown``. The closed state costs
one float comparison per operation.

Each transition is logged once, by the call that makes it: a WARNING when
the circuit opens (the store, the failure, the cooldown) and one when it
closes again (how long it was open, how many operations it refused). A
failed probe keeps the circuit open: that is no new transition. ``failure``
and ``success`` return True for the call that made one, so the store can
count it in the cache that made the call (the breaker is shared by every
cache on the store; the counters are per cache).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("stampede")


class Breaker:
    def __init__(
        self,
        threshold: int = 3,
        cooldown: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if threshold < 1 or cooldown < 0:
            raise ValueError("threshold must be >= 1 and cooldown >= 0")
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._lock = threading.RLock()  # guards the fields below; reentrant (a finalizer)
        self._failures = 0
        self._open_until = -1.0  # < now: closed (or half-open once the cooldown ran out)
        self._probing = False
        self._probe_started = 0.0
        self._opened_at = 0.0  # when the circuit last opened
        self._refused = 0  # operations refused since then
        self._where: object = None  # the store named in the logs, from the opening failure

    @property
    def is_open(self) -> bool:
        return self._failures >= self.threshold

    def allow(self) -> bool:
        """May an operation go to the store now?"""
        if self._failures < self.threshold:
            return True
        with self._lock:
            now = self._clock()
            if now < self._open_until:
                self._refused += 1
                return False
            if self._probing and now < self._probe_started + max(self.cooldown, 1.0):
                self._refused += 1
                return False  # a probe is out; one that never came back is replaced
            self._probing = True  # half-open: this caller probes, the others wait
            self._probe_started = now
            return True

    def release(self) -> None:
        """The operation ended for a reason that says nothing of the store's health."""
        if self._probing:
            with self._lock:
                self._probing = False

    def success(self) -> bool:
        """The store answered; True when that closed the circuit (logged)."""
        if not (self._failures or self._probing):
            return False
        with self._lock:
            if self._failures < self.threshold:  # closed already: nothing to tell
                self._failures = 0
                self._probing = False
                return False
            self._failures = 0
            self._probing = False
            spent, refused, where = self._clock() - self._opened_at, self._refused, self._where
            self._where = None
        # Logged outside the lock: a handler is someone else's code.
        log.warning(
            "%s answers again: circuit closed after %.1f s open (%d operations refused)",
            _named(where),
            spent,
            refused,
        )
        return True

    def failure(self, cause: BaseException | None = None, where: object = None) -> bool:
        """The store failed (``cause``, on ``where``); True when that opened the circuit
        (logged)."""
        with self._lock:
            was_closed = self._failures < self.threshold
            self._failures += 1
            self._probing = False
            if self._failures < self.threshold:
                return False
            now = self._clock()
            self._open_until = now + self.cooldown
            if was_closed:
                self._opened_at, self._refused, self._where = now, 0, where
            failures = self._failures
        if not was_closed:  # a failed probe, or a call sent before it opened
            log.debug(
                "%s failed again: circuit open for another %g s", _named(where), self.cooldown
            )
            return False
        log.warning(
            "%s failed %d time%s in a row (last: %s): circuit open, its operations fail "
            "at once for %g s, then one probes it",
            _named(where),
            failures,
            "" if failures == 1 else "s",
            "?" if cause is None else f"{type(cause).__name__}: {cause}",
            self.cooldown,
        )
        return True


def _named(where: object) -> str:
    return "a store" if where is None else str(where)
