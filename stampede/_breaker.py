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
        self._lock = threading.Lock()  # guards the fields below on the failure path
        self._failures = 0
        self._open_until = -1.0  # < now: closed (or half-open once the cooldown ran out)
        self._probing = False

    @property
    def is_open(self) -> bool:
        return self._failures >= self.threshold

    def allow(self) -> bool:
        """May an operation go to the store now?"""
        if self._failures < self.threshold:
            return True
        with self._lock:
            if self._clock() < self._open_until or self._probing:
                return False
            self._probing = True  # half-open: this caller probes, the others wait
            return True

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
