"""Single-flight: concurrent calls for one key share one execution.

``SingleFlight`` is for threads, ``AsyncSingleFlight`` for asyncio tasks.
Both keep a map key -> in-flight call. The first caller of a key leads (runs
the function), later callers join and wait; when the call ends, whatever ends
it, its map entry is removed if it is still its own (``forget`` may have put
another there) and every waiter is woken.

Rules both follow:
- no user function runs while the group's lock is held;
- an ``Exception`` reaches every caller as the same object; a
  ``BaseException`` that is not an ``Exception`` (interrupt, exit,
  cancellation of the load) stays with the leader and waiters get
  ``LoadAbandoned`` with it as ``__cause__``: nobody hangs, and a worker
  thread is not handed someone else's ``KeyboardInterrupt``;
- a call for a key that this context is already loading (same thread, same
  task, or a task the load started) raises ``RecursiveLoad`` at once;
- ``timeout`` bounds a waiter's wait (``LoadTimeout``); it never starts a load.

asyncio: the load runs as its own task; callers wait on it without owning it,
so a cancelled caller withdraws only itself. When every caller has left, the
load still runs to completion (and a cache still stores its result).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

from ._errors import BlockingWaitInLoop, LoadAbandoned, LoadTimeout, RecursiveLoad

T = TypeVar("T")

# The calls this context is leading, outermost first. Child tasks copy the
# context, so a task started by a loader sees its parent's calls too.
_leading: contextvars.ContextVar[tuple[object, ...]] = contextvars.ContextVar(
    "stampede_leading", default=()
)


class _Call:
    """One in-flight call of a ``SingleFlight``."""

    __slots__ = ("done", "value", "exc", "dups", "fenced")

    def __init__(self) -> None:
        # Made by the first waiter (most loads have none) under the group lock;
        # set once value/exc are final.
        self.done: threading.Event | None = None
        # Written once by the leader before ``done`` is set; only read after it.
        self.value: Any = None
        self.exc: BaseException | None = None
        self.dups = 0  # callers that joined; guarded by the group lock
        self.fenced = False  # set by forget(): the cache must not store the result


class _AsyncCall:
    """One in-flight call of an ``AsyncSingleFlight``: its task and bookkeeping.

    Confined to the event loop of its map: no lock guards it.
    """

    __slots__ = ("task", "dups", "fenced")

    task: asyncio.Task[Any]

    def __init__(self) -> None:
        self.dups = 0
        self.fenced = False


def _wake(waiter: asyncio.Future[bool], _task: object) -> None:
    if not waiter.done():
        waiter.set_result(True)


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


_FINISHED = threading.Event()  # shared "done" of calls that ended before anyone waited
_FINISHED.set()


def _check_recursion(call: object) -> None:
    if call in _leading.get():
        raise RecursiveLoad("a loader asked for the key it is loading")


def _outcome(exc: BaseException | None, value: T) -> T:
    """A waiter's view of a finished call."""
    if exc is None:
        return value
    if isinstance(exc, Exception):
        raise exc
    raise LoadAbandoned(f"the load ended with {type(exc).__name__}") from exc


_live: weakref.WeakSet[SingleFlight] = weakref.WeakSet()


def _after_fork() -> None:
    # The child has one thread: the parent's leaders do not exist here, so their
    # calls would never finish, and a lock held by one of them stays held.
    for flight in list(_live):
        flight._lock = threading.RLock()
        for call in flight._calls.values():
            call.fenced = True
        flight._calls = {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


class SingleFlight:
    """Duplicate-call suppression for threads.

    ``do(key, fn)`` runs ``fn`` once for all concurrent callers of ``key`` and
    returns ``(value, shared)``, ``shared`` telling whether other callers got
    the same result.
    """

    def __init__(self) -> None:
        # Guards _calls and _Call.dups. Reentrant: code that runs on this thread
        # while it holds the lock (a finalizer, a signal handler, a key's __eq__)
        # may call the flight again instead of deadlocking (cachebox #67/#68).
        self._lock = threading.RLock()
        self._calls: dict[Hashable, _Call] = {}
        _live.add(self)

    def do(
        self, key: Hashable, fn: Callable[[], T], *, timeout: float | None = None
    ) -> tuple[T, bool]:
        """Run ``fn`` for ``key`` unless a call is in flight; wait for it then.

        Raises ``LoadTimeout`` when a waiter's ``timeout`` runs out,
        ``RecursiveLoad`` when ``fn`` asks for ``key`` again,
        ``BlockingWaitInLoop`` when a waiter runs inside an event loop.
        """
        call, leader = self._join(key)
        if leader:
            value: T = self._lead(key, call, lambda _call: fn())
        else:
            value = self._wait(call, timeout)
        return value, call.dups > 0

    def forget(self, key: Hashable) -> None:
        """Let the next call of ``key`` start afresh; the running one is marked fenced."""
        with self._lock:
            call = self._calls.pop(key, None)
        if call is not None:
            call.fenced = True

    def __len__(self) -> int:
        return len(self._calls)

    def _forget_all(self, where: Callable[[Hashable], bool] | None = None) -> None:
        """Forget every call in flight (or those whose key satisfies ``where``)."""
        with self._lock:
            keys = [k for k in self._calls if where is None or where(k)]
            calls = [self._calls.pop(k) for k in keys]
        for call in calls:
            call.fenced = True

    # The cache uses the pieces below: it needs the call record (for fencing)
    # and needs to start background refreshes without waiting.

    def _join(self, key: Hashable) -> tuple[_Call, bool]:
        with self._lock:
            call = self._calls.get(key)
            if call is None:
                call = self._calls[key] = _Call()
                return call, True
            _check_recursion(call)
            call.dups += 1
            if call.done is None:
                call.done = threading.Event()
        return call, False

    def _reserve(self, key: Hashable) -> _Call | None:
        """Register a call for ``key`` if none is in flight (for a background run)."""
        with self._lock:
            if key in self._calls:
                return None
            call = self._calls[key] = _Call()
            return call

    def _lead(self, key: Hashable, call: _Call, fn: Callable[[_Call], T]) -> T:
        token = _leading.set((*_leading.get(), call))
        try:
            value = fn(call)
        except BaseException as exc:
            call.exc = exc
            raise
        else:
            call.value = value
            return value
        finally:
            _leading.reset(token)
            with self._lock:
                if self._calls.get(key) is call:
                    del self._calls[key]
                done = call.done
                if done is None:  # no waiter yet; a late joiner finds it finished
                    done = call.done = _FINISHED
            if done is not _FINISHED:
                done.set()

    @staticmethod
    def _wait(call: _Call, timeout: float | None) -> Any:
        assert call.done is not None  # made in _join
        if not call.done.is_set():
            if asyncio.events._get_running_loop() is not None:
                raise BlockingWaitInLoop(
                    "waiting for another caller's load would block the running "
                    "event loop; use AsyncCoalescingCache / AsyncSingleFlight"
                )
            if not call.done.wait(timeout):
                raise LoadTimeout(f"no result after waiting {timeout} s for another load")
        return _outcome(call.exc, call.value)


class AsyncSingleFlight:
    """Duplicate-call suppression for asyncio tasks.

    ``await do(key, fn)`` runs ``fn()`` (a coroutine function) once, as its
    own task, for all concurrent callers of ``key`` on the running loop.
    The object binds to no loop: it keeps one map per running loop.
    """

    def __init__(self) -> None:
        self._maps: dict[asyncio.AbstractEventLoop, dict[Hashable, _AsyncCall]] = {}

    async def do(
        self,
        key: Hashable,
        fn: Callable[[], Awaitable[T]],
        *,
        timeout: float | None = None,
    ) -> tuple[T, bool]:
        """Await the one execution of ``fn()`` for ``key``; see ``SingleFlight.do``.

        A cancelled caller withdraws alone: the task goes on for the others.
        """
        call, _ = self._join(key, lambda _call: fn())
        value: T = await self._wait(call, timeout)
        return value, call.dups > 0

    def forget(self, key: Hashable) -> None:
        """Let the next call of ``key`` start afresh; the running one is marked fenced."""
        for calls in list(self._maps.values()):
            call = calls.pop(key, None)
            if call is not None:
                call.fenced = True

    def __len__(self) -> int:
        return sum(len(calls) for calls in list(self._maps.values()))

    def _forget_all(self, where: Callable[[Hashable], bool] | None = None) -> None:
        for calls in list(self._maps.values()):
            for key in [k for k in list(calls) if where is None or where(k)]:
                call = calls.pop(key, None)
                if call is not None:
                    call.fenced = True

    def _calls(self) -> tuple[asyncio.AbstractEventLoop, dict[Hashable, _AsyncCall]]:
        loop = asyncio.get_running_loop()
        calls = self._maps.get(loop)
        if calls is None:
            calls = self._maps.setdefault(loop, {})
        return loop, calls

    def _join(
        self, key: Hashable, fn: Callable[[_AsyncCall], Awaitable[T]]
    ) -> tuple[_AsyncCall, bool]:
        loop, calls = self._calls()
        call = calls.get(key)
        if call is not None:
            _check_recursion(call)
            call.dups += 1
            return call, False
        return self._start(loop, calls, key, fn), True

    def _reserve(
        self, key: Hashable, fn: Callable[[_AsyncCall], Awaitable[Any]]
    ) -> _AsyncCall | None:
        """Start a call for ``key`` if none is in flight (for a background run).

        The run is not part of the starting task's loads: its ``_leading`` is empty.
        """
        loop, calls = self._calls()
        if key in calls:
            return None
        token = _leading.set(())
        try:
            return self._start(loop, calls, key, fn)  # the task copies this context
        finally:
            _leading.reset(token)

    def _start(
        self,
        loop: asyncio.AbstractEventLoop,
        calls: dict[Hashable, _AsyncCall],
        key: Hashable,
        fn: Callable[[_AsyncCall], Awaitable[T]],
    ) -> _AsyncCall:
        call = _AsyncCall()
        call.task = loop.create_task(self._lead(call, fn))
        calls[key] = call
        call.task.add_done_callback(functools.partial(self._finished, loop, calls, key, call))
        return call

    @staticmethod
    async def _lead(call: _AsyncCall, fn: Callable[[_AsyncCall], Awaitable[T]]) -> T:
        # Runs inside the load task, whose context is its own copy.
        _leading.set((*_leading.get(), call))
        return await fn(call)

    def _finished(
        self,
        loop: asyncio.AbstractEventLoop,
        calls: dict[Hashable, _AsyncCall],
        key: Hashable,
        call: _AsyncCall,
        task: asyncio.Task[Any],
    ) -> None:
        if calls.get(key) is call:
            del calls[key]
        if not calls and self._maps.get(loop) is calls:
            del self._maps[loop]
        if not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" warning when all callers left

    @staticmethod
    async def _wait(call: _AsyncCall, timeout: float | None) -> Any:
        task = call.task
        if not task.done():
            # Each caller waits on a future of its own, woken by the task's
            # done callback: cancelling the caller cancels that future only,
            # never the load task (awaiting the task itself would cancel it).
            # Cheaper than asyncio.wait or shield for thousands of waiters.
            loop = task.get_loop()
            waiter: asyncio.Future[bool] = loop.create_future()
            wake = functools.partial(_wake, waiter)
            task.add_done_callback(wake)
            timer = None if timeout is None else loop.call_later(timeout, _expire, waiter)
            try:
                finished = await waiter
            finally:
                if timer is not None:
                    timer.cancel()
                if not task.done():
                    task.remove_done_callback(wake)
            if not finished:
                raise LoadTimeout(f"no result after waiting {timeout} s for another load")
        if task.cancelled():
            raise LoadAbandoned("the load task was cancelled")
        exc = task.exception()
        return _outcome(exc, task.result() if exc is None else None)
