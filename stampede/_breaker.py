"""A circuit breaker for a shared store.

After ``threshold`` failures in a row the circuit opens: for ``cooldown``
seconds every operation fails at once, without paying a connect timeout.
Then one operation at a time is let through as a probe; a success closes the
circuit, a failure opens it for another ``cooldown``. The closed state costs
one float comparison per operation.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


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
                return False
            if self._probing and now < self._probe_started + max(self.cooldown, 1.0):
                return False  # a probe is out; one that never came back is replaced
            self._probing = True  # half-open: this caller probes, the others wait
            self._probe_started = now
            return True

    def release(self) -> None:
        """The operation ended for a reason that says nothing of the store's health."""
        if self._probing:
            with self._lock:
                self._probing = False

    def success(self) -> None:
        if self._failures or self._probing:
            with self._lock:
                self._failures = 0
                self._probing = False

    def failure(self) -> None:
        with self._lock:
            self._failures += 1
            self._probing = False
            if self._failures >= self.threshold:
                self._open_until = self._clock() + self.cooldown
