"""Code that runs on a thread while it holds one of stampede's locks may call the
cache again without deadlocking: a garbage-collector finalizer or a signal
handler (they run between any two bytecodes, allocations under a lock
included), a key's ``__eq__``/``__hash__``, a user mapping's ``__setitem__``.

The audit reproduced the deadlock with ``gc.set_threshold(5, 1, 1)`` and a
finalizer, and with a 2 kHz signal storm; here the re-entry is made certain
instead: by a key whose ``__eq__`` runs under the single-flight's lock, by a
mapping whose write runs under the fencing lock, and by a finalizer forced
to run under each lock. Each call runs on a thread joined with a deadline,
so a deadlock fails the test instead of hanging it (the cachebox #67/#68
class of bug).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from stampede import CoalescingCache, SingleFlight
from stampede.testing import Gate
from tests.helpers import in_thread

pytestmark = pytest.mark.timeout(30)


def finishes(fn: Callable[[], Any], within: float = 10.0) -> Any:
    """Run ``fn`` on a thread; its result, or a failure (not a hang) if it deadlocks."""
    thread, out = in_thread(fn)
    thread.join(within)
    assert not thread.is_alive(), "deadlocked: a call re-entered a lock its thread held"
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


class Colliding:
    """Keys with one hash: a dict lookup compares the key it holds with the one
    looked up (the held key's ``__eq__``), under whatever lock guards the dict,
    and ``on_eq`` runs there."""

    def __init__(self, name: str, on_eq: Callable[[], object] | None = None) -> None:
        self.name = name
        self.on_eq = on_eq

    def __hash__(self) -> int:
        return 42

    def __eq__(self, other: object) -> bool:
        if self.on_eq is not None:
            on_eq, self.on_eq = self.on_eq, None  # once
            on_eq()
        return isinstance(other, Colliding) and other.name == self.name


def test_code_run_under_the_flight_lock_may_call_the_cache() -> None:
    cache: CoalescingCache[str] = CoalescingCache({}, ttl=60)
    gate = Gate("a")
    a = Colliding("a")
    leader = threading.Thread(target=cache.get_or_load, args=(a, gate))
    leader.start()
    assert gate.entered.wait(10)  # "a" is in flight: its key sits in the flight map
    nested: list[str] = []
    a.on_eq = lambda: nested.append(cache.get_or_load("c", lambda: "c"))
    assert finishes(lambda: cache.get_or_load(Colliding("b"), lambda: "b")) == "b"
    assert nested == ["c"]
    gate.open()
    leader.join(10)


def test_code_run_under_the_bare_single_flight_lock_may_use_it() -> None:
    flight = SingleFlight()
    gate = Gate("a")
    a = Colliding("a")
    leader = threading.Thread(target=flight.do, args=(a, gate))
    leader.start()
    assert gate.entered.wait(10)
    nested: list[Any] = []
    a.on_eq = lambda: nested.append(flight.do("c", lambda: "c"))
    assert finishes(lambda: flight.do(Colliding("b"), lambda: "b")) == ("b", False)
    assert nested == [("c", False)]
    gate.open()
    leader.join(10)


class Hooked(dict):  # type: ignore[type-arg]
    """A user's mapping whose write runs ``on_write`` (under the cache's fencing lock)."""

    on_write: Callable[[], object] | None = None

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        if self.on_write is not None:
            on_write, self.on_write = self.on_write, None
            on_write()


def test_code_run_under_the_fencing_lock_may_call_the_cache() -> None:
    store = Hooked()
    cache: CoalescingCache[str] = CoalescingCache(store, ttl=60)
    # The load's commit writes under the key's fencing lock; the write runs user
    # code that invalidates the same key (the same, non-reentrant stripe before).
    store.on_write = lambda: cache.invalidate("k")
    assert finishes(lambda: cache.get_or_load("k", lambda: "v")) == "v"
    assert cache.get("k") is None  # the invalidate ran, after the write
    store.on_write = lambda: cache.set("k", "from the hook")
    assert finishes(lambda: cache.set("k", "set")) is None
    assert cache.get("k") == "from the hook"
    store.on_write = lambda: cache.clear()  # every stripe, one of them held
    assert finishes(lambda: cache.set("j", "x")) is None


class Finalizer:
    """An object whose ``__del__`` calls the cache, as a user's finalizer might."""

    def __init__(self, call: Callable[[], object], done: list[object]) -> None:
        self.call, self.done = call, done

    def __del__(self) -> None:
        self.done.append(self.call())


def test_a_finalizer_run_under_the_locks_may_call_the_cache() -> None:
    """The audit's case: a finalizer runs while a lock is held, on that thread."""
    cache: CoalescingCache[str] = CoalescingCache({}, ttl=60)
    done: list[object] = []
    flight_lock = cache._flight._lock
    fence = cache._host.fences.fence("k")

    def under(lock: Any) -> None:
        with lock:  # as the cache holds it, then a collection runs a finalizer
            finalizer = Finalizer(lambda: cache.get_or_load("k", lambda: "v"), done)
            del finalizer

    finishes(lambda: under(flight_lock))
    finishes(lambda: under(fence))
    assert done == ["v", "v"]
