"""Helpers for deterministic tests of code that uses stampede (and of stampede).

- ``FakeClock``: a monotonic clock the test moves by hand; pass it as ``clock=``.
- ``Draws``: a scripted random source; pass it as ``random=``.
- ``Gate`` / ``AsyncGate``: loaders that count their calls and block until the
  test opens them, so a test decides when a load ends instead of sleeping.
- ``wait_until``: wait for a condition (a waiter count, a counter) with a
  hard deadline; for reaching a quiet point, never for ordering by time.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")

DEFAULT_DEADLINE = 10.0


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back")
        with self._lock:
            self._now += seconds
            return self._now

    def set(self, now: float) -> None:
        if now < self._now:
            raise ValueError("a monotonic clock does not go back")
        self._now = now


class Draws:
    """A random source returning scripted values in [0, 1], then ``then`` forever."""

    def __init__(self, values: Iterable[float] = (), then: float = 0.5) -> None:
        self._values = itertools.chain(values, itertools.repeat(then))
        self.count: int = 0

    def __call__(self) -> float:
        self.count += 1
        return next(self._values)


def wait_until(
    condition: Callable[[], bool], deadline: float = DEFAULT_DEADLINE, what: str = ""
) -> None:
    """Return once ``condition()`` is true; ``AssertionError`` after ``deadline`` s."""
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what or condition!r}")
        time.sleep(0.0005)


async def async_wait_until(
    condition: Callable[[], bool], deadline: float = DEFAULT_DEADLINE, what: str = ""
) -> None:
    """``wait_until`` for a coroutine: yields to the loop between checks."""
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what or condition!r}")
        await asyncio.sleep(0)


class Gate(Generic[T]):
    """A sync loader that records its calls and blocks until ``open()``.

    ``Gate(value)`` returns ``value``; ``Gate(error=exc)`` raises ``exc``
    (a type or an instance). ``entered`` is set when a call starts.
    """

    def __init__(
        self,
        value: T | None = None,
        *,
        error: BaseException | type[BaseException] | None = None,
        opened: bool = False,
        deadline: float = DEFAULT_DEADLINE,
    ) -> None:
        self.value = value
        self.error = error
        self.calls: int = 0
        self.entered: threading.Event = threading.Event()
        self._open = threading.Event()
        self._lock = threading.Lock()
        self._deadline = deadline
        if opened:
            self._open.set()

    def open(self) -> None:
        self._open.set()

    def __call__(self) -> T:
        with self._lock:
            self.calls += 1
        self.entered.set()
        if not self._open.wait(self._deadline):
            raise AssertionError("Gate was never opened")
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


class AsyncGate(Generic[T]):
    """An async loader that records its calls and waits until ``open()``."""

    def __init__(
        self,
        value: T | None = None,
        *,
        error: BaseException | type[BaseException] | None = None,
        opened: bool = False,
    ) -> None:
        self.value = value
        self.error = error
        self.calls: int = 0
        self.cancelled: int = 0
        self._open = asyncio.Event()
        self.entered: asyncio.Event = asyncio.Event()
        if opened:
            self._open.set()

    def open(self) -> None:
        self._open.set()

    async def __call__(self) -> T:
        self.calls += 1
        self.entered.set()
        try:
            await asyncio.wait_for(self._open.wait(), DEFAULT_DEADLINE)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


def counting(fn: Callable[[], T]) -> Callable[[], T]:
    """Wrap a loader so ``wrapper.calls`` counts its calls (thread-safe)."""
    lock = threading.Lock()

    def wrapper() -> T:
        with lock:
            wrapper.calls += 1  # type: ignore[attr-defined]
        return fn()

    wrapper.calls = 0  # type: ignore[attr-defined]
    return wrapper


__all__ = ["AsyncGate", "Draws", "FakeClock", "Gate", "async_wait_until", "counting", "wait_until"]
