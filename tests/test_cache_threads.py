"""CoalescingCache under real threads: coalescing, early refresh, fencing, failures."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from stampede import CoalescingCache, LoadAbandoned, LoadTimeout, RecursiveLoad
from stampede.testing import Draws, FakeClock, Gate, wait_until

from .helpers import fork, join_all, run_threads, wait_child


def coalesced(cache: CoalescingCache[Any]) -> int:
    return cache.stats().coalesced


class NotFound(LookupError):
    pass


@pytest.mark.parametrize("trial", range(3))
def test_cold_key_thousand_threads_one_load(trial: int, fast_switching: None) -> None:
    cache: CoalescingCache[object] = CoalescingCache(ttl=60)
    value = object()
    gate = Gate(value)
    barrier = threading.Barrier(1000)
    got: list[object] = []
    lock = threading.Lock()

    def caller() -> None:
        barrier.wait()
        v = cache.get_or_load("k", gate)
        with lock:
            got.append(v)

    threads = run_threads(1000, caller)
    wait_until(lambda: coalesced(cache) == 999, what="999 coalesced callers")
    gate.open()
    join_all(threads)
    assert gate.calls == 1
    assert len(got) == 1000 and all(v is value for v in got)
    assert len(cache._flight) == 0
    assert cache.get_or_load("k", gate) is value and gate.calls == 1


def test_ungated_hammering_loads_once(fast_switching: None) -> None:
    """No gate: the leader's second look stops late arrivals from loading again."""
    cache: CoalescingCache[int] = CoalescingCache(ttl=60)
    calls = 0
    lock = threading.Lock()

    def loader() -> int:
        nonlocal calls
        with lock:
            calls += 1
        return 7

    barrier = threading.Barrier(100)

    def caller() -> None:
        barrier.wait()
        for _ in range(100):
            assert cache.get_or_load("k", loader) == 7

    join_all(run_threads(100, caller))
    assert calls == 1


def test_early_refresh_runs_once_while_readers_keep_the_value() -> None:
    clock = FakeClock()
    cache: CoalescingCache[str] = CoalescingCache(
        ttl=10, beta=1.0, clock=clock, random=Draws(then=0.99)
    )

    def first() -> str:
        clock.advance(0.5)  # a load that took 0.5 s
        return "old"

    cache.get_or_load("k", first)
    clock.advance(9.9)
    refresh = Gate("new")
    results: list[str] = []
    lock = threading.Lock()

    def reader() -> None:
        v = cache.get_or_load("k", refresh)
        with lock:
            results.append(v)

    join_all(run_threads(50, reader))  # all return at once: nobody waits for the load
    assert results == ["old"] * 50
    refresh.entered.wait(5)
    assert refresh.calls == 1
    refresh.open()
    wait_until(lambda: cache.stats().loads == 2)
    wait_until(lambda: len(cache._flight) == 0)
    assert cache.get_or_load("k", refresh) == "new"
    assert refresh.calls == 1
    assert cache.stats().early_refreshes == 1


def test_stale_readers_do_not_wait_and_misses_join_the_refresh() -> None:
    clock = FakeClock()
    cache: CoalescingCache[str] = CoalescingCache(ttl=1, stale_ttl=5, beta=0, clock=clock)
    cache.get_or_load("k", lambda: "old")
    clock.advance(2)
    refresh = Gate("new")
    assert cache.get_or_load("k", refresh) == "old"
    refresh.entered.wait(5)
    clock.advance(10)  # the stale window ends while the refresh still runs
    got: list[str] = []
    t = threading.Thread(target=lambda: got.append(cache.get_or_load("k", refresh)))
    t.start()
    wait_until(lambda: coalesced(cache) == 1, what="the miss joins the running refresh")
    refresh.open()
    join_all([t])
    assert got == ["new"] and refresh.calls == 1


def test_invalidate_during_load_fences_the_result() -> None:
    cache: CoalescingCache[str] = CoalescingCache(ttl=60)
    gate = Gate("loaded-before-invalidate")
    got: list[str] = []
    t = threading.Thread(target=lambda: got.append(cache.get_or_load("k", gate)))
    t.start()
    gate.entered.wait(5)
    cache.invalidate("k")
    gate.open()
    join_all([t])
    assert got == ["loaded-before-invalidate"]  # the caller still gets it
    assert cache.get("k") is None  # ... but it was not stored
    assert cache.stats().fenced == 1
    assert cache.get_or_load("k", lambda: "fresh") == "fresh"


def test_set_during_load_wins_over_the_load() -> None:
    cache: CoalescingCache[str] = CoalescingCache(ttl=60)
    gate = Gate("from-load")
    t = threading.Thread(target=cache.get_or_load, args=("k", gate))
    t.start()
    gate.entered.wait(5)
    cache.set("k", "from-set")
    gate.open()
    join_all([t])
    assert cache.get("k") == "from-set"


def test_invalidate_during_load_lets_new_callers_start_a_new_load() -> None:
    cache: CoalescingCache[str] = CoalescingCache(ttl=60)
    old = Gate("old")
    t = threading.Thread(target=cache.get_or_load, args=("k", old))
    t.start()
    old.entered.wait(5)
    cache.invalidate("k")
    assert cache.get_or_load("k", lambda: "new") == "new"
    old.open()
    join_all([t])
    assert cache.get("k") == "new"  # the fenced old load did not overwrite it


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_base_exceptions_are_never_negative_cached(exc_type: type[BaseException]) -> None:
    cache: CoalescingCache[str] = CoalescingCache(ttl=60, cache_errors=(BaseException,))
    gate = Gate(error=exc_type())
    seen: list[BaseException] = []
    lock = threading.Lock()

    def caller() -> None:
        try:
            cache.get_or_load("k", gate)
        except BaseException as exc:
            with lock:
                seen.append(exc)

    threads = run_threads(5, caller)
    wait_until(lambda: coalesced(cache) == 4)
    gate.open()
    join_all(threads)
    assert sorted(type(e).__name__ for e in seen) == sorted(
        [exc_type.__name__] + ["LoadAbandoned"] * 4
    )
    assert all(isinstance(e.__cause__, exc_type) for e in seen if isinstance(e, LoadAbandoned))
    assert cache.get_or_load("k", lambda: "ok") == "ok"  # nothing was cached


def test_error_is_shared_by_waiters_then_retried_once() -> None:
    cache: CoalescingCache[str] = CoalescingCache(ttl=60)
    boom = ValueError("boom")
    gate = Gate(error=boom)
    seen: list[BaseException] = []
    lock = threading.Lock()

    def caller() -> None:
        try:
            cache.get_or_load("k", gate)
        except ValueError as exc:
            with lock:
                seen.append(exc)

    threads = run_threads(20, caller)
    wait_until(lambda: coalesced(cache) == 19)
    gate.open()
    join_all(threads)
    assert gate.calls == 1 and len(seen) == 20 and all(e is boom for e in seen)
    assert cache.get_or_load("k", lambda: "recovered") == "recovered"


def test_negative_entry_raised_to_concurrent_waiters_too() -> None:
    cache: CoalescingCache[str] = CoalescingCache(ttl=60, cache_errors=(KeyError,))
    gate = Gate(error=KeyError("missing"))
    seen: list[BaseException] = []
    lock = threading.Lock()

    def caller() -> None:
        try:
            cache.get_or_load("k", gate)
        except KeyError as exc:
            with lock:
                seen.append(exc)

    threads = run_threads(10, caller)
    wait_until(lambda: coalesced(cache) == 9)
    gate.open()
    join_all(threads)
    assert len(seen) == 10 and gate.calls == 1
    with pytest.raises(KeyError):
        cache.get_or_load("k", gate)
    assert gate.calls == 1


class _Unrebuildable(Exception):
    """An error whose class cannot be made again from its args."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Unrebuildable:
        if "token" not in kwargs:
            raise TypeError("needs token=")
        return super().__new__(cls)

    def __init__(self, message: str, *, token: str) -> None:
        super().__init__(message)


def test_an_error_that_cannot_be_rebuilt_is_not_negative_cached() -> None:
    """A listed error that cannot be rebuilt from its args is shared, never negative-cached.

    Regression test for c5b4412 (Errors that cannot be rebuilt from their args are not
    negative-cached).
    """
    cache: CoalescingCache[str] = CoalescingCache(cache_errors=(_Unrebuildable,))
    calls = 0

    def load() -> str:
        nonlocal calls
        calls += 1
        raise _Unrebuildable("nope", token="t")

    for _ in range(2):
        with pytest.raises(_Unrebuildable):
            cache.get_or_load("k", load)
    assert calls == 2  # shared with its callers, never cached


def test_a_failed_first_read_does_not_let_an_error_replace_a_stale_value() -> None:
    """A stale value found on the second read, after a failed first one, beats a listed error.

    Regression test for 3a21f4a (Review fixes: a failed first read no longer lets an
    error replace a servable stale value).
    """

    class Flaky(dict[Any, Any]):
        fail = False

        def get(self, key: Any, default: Any = None) -> Any:
            if self.fail:
                self.fail = False
                raise OSError("the store hiccups")
            return super().get(key, default)

    store = Flaky()
    clock = FakeClock()
    cache: CoalescingCache[str] = CoalescingCache(
        store, ttl=1, stale_ttl=100, beta=0, cache_errors=(NotFound,), clock=clock
    )
    cache.get_or_load("k", lambda: "good")
    clock.advance(2)
    store.fail = True

    def missing() -> str:
        raise NotFound("k")

    assert cache.get_or_load("k", missing) == "good"  # the stale value, not the error
    assert cache.get("k") == "good"


def test_recursive_get_or_load_raises() -> None:
    cache: CoalescingCache[int] = CoalescingCache(ttl=60)

    def loader() -> int:
        with pytest.raises(RecursiveLoad):
            cache.get_or_load("k", loader)
        return 1

    assert cache.get_or_load("k", loader) == 1


def test_wait_timeout_raises_and_starts_no_load() -> None:
    cache: CoalescingCache[str] = CoalescingCache(ttl=60, wait_timeout=0.05)
    gate = Gate("v")
    t = threading.Thread(target=cache.get_or_load, args=("k", gate))
    t.start()
    gate.entered.wait(5)
    with pytest.raises(LoadTimeout):
        cache.get_or_load("k", gate)
    gate.open()
    join_all([t])
    assert gate.calls == 1
    assert cache.get("k") == "v"


def test_refresh_in_reader_context() -> None:
    """A background refresh sees the context variables of the reader that started it."""
    import contextvars

    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
    clock = FakeClock()
    cache: CoalescingCache[str] = CoalescingCache(ttl=1, stale_ttl=10, beta=0, clock=clock)
    cache.get_or_load("k", lambda: "old")
    clock.advance(2)
    seen: list[str] = []

    def loader() -> str:
        seen.append(request_id.get())
        return "new"

    request_id.set("req-42")
    assert cache.get_or_load("k", loader) == "old"
    wait_until(lambda: cache.stats().loads == 2)
    assert seen == ["req-42"]


def test_a_refresh_started_inside_a_loader_is_not_recursive() -> None:
    """A background refresh started inside a loader does not inherit that loader's loads.

    Regression test for 3a21f4a (Review fixes: background refreshes start with no
    inherited loads).
    """
    clock = FakeClock()
    cache: CoalescingCache[str] = CoalescingCache(ttl=1, stale_ttl=100, beta=0, clock=clock)
    cache.get_or_load("b", lambda: "b1")
    clock.advance(2)  # "b" is stale now

    def load_a() -> str:
        return "a:" + cache.get_or_load("b", lambda: "b2:" + cache.get_or_load("a", load_a))

    assert cache.get_or_load("a", load_a) == "a:b1"
    wait_until(lambda: cache.stats().loads + cache.stats().load_errors == 3)
    assert cache.stats().load_errors == 0
    assert cache.get("b") == "b2:a:b1"


def test_a_stale_read_at_interpreter_exit_still_serves(tmp_path: Path) -> None:
    """A stale read at interpreter exit (refresh pool shut down) still gets the stale value.

    Regression test for 3a21f4a (Review fixes: ...). Its subject does not list this
    one: the fix is the RuntimeError a refresh that cannot start now swallows (_cache.py).
    """
    script = (
        "import atexit, stampede\n"
        "from stampede.testing import FakeClock\n"
        "clock = FakeClock()\n"
        "cache = stampede.CoalescingCache(ttl=1, stale_ttl=100, beta=0, clock=clock)\n"
        "cache.get_or_load('k', lambda: 'old')\n"
        "clock.advance(2)\n"
        "atexit.register(lambda: print(cache.get_or_load('k', lambda: 'new')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "old"


def test_invalid_parameters_are_rejected() -> None:
    for bad in (
        {"ttl": 0},
        {"ttl": -1},
        {"ttl": float("nan")},
        {"beta": -0.1},
        {"stale_ttl": float("inf")},
        {"wait_timeout": 0},
        {"error_ttl": -1},
    ):
        with pytest.raises(ValueError):
            CoalescingCache(**bad)
    with pytest.raises(TypeError):
        CoalescingCache(ttl="soon")
    with pytest.raises(TypeError):
        CoalescingCache(cache_errors=("KeyError",))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        CoalescingCache(backend=42)
    with pytest.raises(ValueError, match="unsupported backend URL"):
        CoalescingCache(backend="ftp://x")
    with pytest.raises(ValueError, match="distributed"):
        CoalescingCache(distributed=True)


def test_async_loader_in_sync_cache_is_a_clear_error() -> None:
    cache: CoalescingCache[Any] = CoalescingCache(ttl=60)

    async def fetch() -> int:
        return 1

    with pytest.raises(TypeError, match="AsyncCoalescingCache"):
        cache.get_or_load("k", fetch)
    assert cache.get("k") is None  # nothing cached


def test_a_foreign_object_with_a_bad_check_at_is_a_miss() -> None:
    """An object in the store with a non-numeric ``check_at`` is a miss, not a TypeError.

    Regression test for 3a21f4a (Review fixes: ...). Its subject does not list this
    one: the fix is the hit path taking a TypeError, like an AttributeError, for "not
    an entry".
    """

    class Impostor:
        check_at = "later"
        value = "not ours"

    cache: CoalescingCache[str] = CoalescingCache({"k": Impostor()})
    assert cache.get_or_load("k", lambda: "loaded") == "loaded"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_wait_for_the_parents_loads() -> None:
    cache: CoalescingCache[str] = CoalescingCache(ttl=60)
    gate = Gate("parent")
    t = threading.Thread(target=cache.get_or_load, args=("k", gate))
    t.start()
    assert gate.entered.wait(5)  # the parent's thread leads "k" and holds it
    pid = fork()  # with threads running
    if pid == 0:  # the child: that leader thread does not exist here
        code = 1
        try:
            if cache.get_or_load("k", lambda: "child") == "child":
                code = 0
        finally:
            os._exit(code)
    assert wait_child(pid, 10, "the child hung on its parent's in-flight load") == 0
    gate.open()
    join_all([t])
