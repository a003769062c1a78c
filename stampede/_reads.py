"""Coalesced reads: concurrent reads of one key in one process share one store read.

``ReadGroup`` is for threads, ``AsyncReadGroup`` for asyncio tasks (one map
per event loop: a task waits only on its own loop). Both keep a map store
key -> read in flight; a cache uses one for a store reached by a round trip
(Redis, disk), none for a mapping of this process.

- The first reader of a key reads inline, on its own thread or task: an
  uncontended read costs one map entry (and, for threads, two short holds of
  a lock); no task, no event, no thread.
- Later readers of the key wait for that read (on an event the first of them
  makes) and get the same outcome: the entry, or the exception, which each
  then handles as its own failed read (the store-failure rules: fail open,
  or raise when configured to). The map is keyed by the store key, so a
  reader only ever gets its own key's read.
- A first reader that leaves without an outcome (cancelled, interrupted)
  wakes its waiters with none, and they read again (one of them first):
  nobody hangs, and nobody is handed someone else's cancellation.
- ``forget(k)`` is called once a write of ``k`` by this process is done (the
  cache's fences do it as the write's fence is left): readers arriving after
  it start a new read, so a read that began before a completed ``set``,
  ``invalidate``, commit or ``clear`` is never handed to a reader who came
  after it. A reader that joined before the write was done is concurrent
  with it, and may get either state.
- A thread that asks again for the key it is reading (a finalizer, a signal
  handler) reads alone instead of waiting for itself.
- After ``fork`` the child's maps are empty: the parent's readers do not
  exist there.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

# A read's outcome: (entry, None), or (None, the exception the read raised).
Outcome = tuple[Any, Exception | None]


_PENDING: Any = object()  # a read's outcome before it ends


class _Read:
    """One read in flight of a ``ReadGroup``."""

    __slots__ = ("owner", "outcome", "done", "waiters")

    def __init__(self, owner: int) -> None:
        self.owner = owner  # the reading thread
        # Guarded by the group lock: _PENDING until the read ends, then its outcome
        # (None: it ended without one, read again); ``done``, made by the first
        # waiter (most reads have none), is set once the outcome is final.
        self.outcome: Outcome | None = _PENDING
        self.done: threading.Event | None = None
        self.waiters = 0


class ReadGroup:
    """Coalesced reads for threads; see the module docstring.

    An uncontended read takes the lock once: it enters the map with one atomic
    ``setdefault`` (a store key is a ``str``: no Python code runs in it), and
    leaves it, publishing its outcome, under the lock, where waiters register.
    """

    def __init__(self) -> None:
        # Reentrant: a finalizer run while it is held may read through the cache.
        self._lock = threading.RLock()
        self._reads: dict[Hashable, _Read] = {}  # entered atomically; left under _lock
        _live.add(self)

    def read(self, k: Hashable, fn: Callable[[Hashable], Any]) -> Outcome:
        """``fn(k)``'s outcome, shared with the other threads reading ``k`` meanwhile."""
        me = threading.get_ident()
        while True:
            call = _Read(me)
            current = self._reads.setdefault(k, call)
            if current is call:
                break
            if current.owner == me:  # this thread's own read, re-entered: read alone
                return _outcome(fn, k)
            done: threading.Event | None = None
            with self._lock:
                outcome = current.outcome
                if outcome is _PENDING:
                    current.waiters += 1
                    done = current.done
                    if done is None:
                        done = current.done = threading.Event()
            if done is not None:
                done.wait()
                with self._lock:
                    current.waiters -= 1
                    outcome = current.outcome
            if outcome is not None:
                return outcome
            # Its reader left without an outcome: read again (or join who does).
        outcome = None
        try:
            outcome = _outcome(fn, k)
            return outcome
        finally:  # whatever ends the read; a BaseException leaves outcome None
            with self._lock:
                if self._reads.get(k) is call:
                    del self._reads[k]
                call.outcome = outcome
                done = call.done
            if done is not None:
                done.set()

    def forget(self, k: Hashable) -> None:
        """Readers of ``k`` from now on start a new read (a write of ``k`` is done)."""
        with self._lock:
            self._reads.pop(k, None)

    def forget_all(self) -> None:
        with self._lock:
            self._reads.clear()

    def waiting(self, k: Hashable) -> int:
        """How many readers wait for the read of ``k`` in flight (tests poll it)."""
        with self._lock:
            call = self._reads.get(k)
            return 0 if call is None else call.waiters


def _outcome(fn: Callable[[Hashable], Any], k: Hashable) -> Outcome:
    try:
        return fn(k), None
    except Exception as exc:
        return None, exc


class _AsyncRead:
    """One read in flight of an ``AsyncReadGroup``."""

    __slots__ = ("done", "outcome", "waiters")

    def __init__(self) -> None:
        self.done: asyncio.Event | None = None  # made by the first waiter
        self.outcome: Outcome | None = None
        self.waiters = 0


class AsyncReadGroup:
    """Coalesced reads for asyncio tasks; see the module docstring."""

    def __init__(self) -> None:
        # One map per event loop, used only from its loop's thread (``forget`` of
        # another thread only pops); the registry of loops is guarded by _lock.
        self._loops: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[Hashable, _AsyncRead]
        ] = weakref.WeakKeyDictionary()
        self._lock = threading.RLock()
        # The last loop's map, found without the weak dictionary (a read's hot path).
        self._last: tuple[weakref.ref[asyncio.AbstractEventLoop], dict[Hashable, _AsyncRead]] = (
            _no_loop,
            {},
        )
        _alive.add(self)

    def _of_loop(self) -> dict[Hashable, _AsyncRead]:
        loop = asyncio.get_running_loop()
        last_loop, reads = self._last
        if last_loop() is loop:
            return reads
        with self._lock:
            reads = self._loops.setdefault(loop, {})
            self._last = (weakref.ref(loop), reads)
        return reads

    async def read(self, k: Hashable, fn: Callable[[Hashable], Awaitable[Any]]) -> Outcome:
        """``await fn(k)``'s outcome, shared with this loop's other tasks reading ``k``."""
        reads = self._of_loop()
        call = reads.get(k)
        while call is not None:
            call.waiters += 1
            done = call.done
            if done is None:
                done = call.done = asyncio.Event()
            try:
                await done.wait()  # a cancelled waiter leaves alone
            finally:
                call.waiters -= 1
            if call.outcome is not None:
                return call.outcome
            call = reads.get(k)  # its reader was cancelled: read again, or join who does
        call = reads[k] = _AsyncRead()
        outcome: Outcome | None = None
        try:
            try:
                outcome = await fn(k), None
            except Exception as exc:
                outcome = None, exc
            return outcome
        finally:  # whatever ends the read; a cancellation leaves outcome None
            if reads.get(k) is call:
                reads.pop(k, None)  # (forget on another thread may have popped it)
            call.outcome = outcome
            if call.done is not None:
                call.done.set()

    def forget(self, k: Hashable) -> None:
        """Readers of ``k`` from now on start a new read, on every loop."""
        with self._lock:
            maps = list(self._loops.values())
        for reads in maps:
            reads.pop(k, None)

    def forget_all(self) -> None:
        with self._lock:
            maps = list(self._loops.values())
        for reads in maps:
            reads.clear()

    def waiting(self, k: Hashable) -> int:
        """How many tasks of the running loop wait for the read of ``k`` in flight."""
        call = self._of_loop().get(k)
        return 0 if call is None else call.waiters


class _NoLoop:
    pass


_no_loop_object = _NoLoop()
_no_loop: weakref.ref[Any] = weakref.ref(_no_loop_object)  # matches no loop


_live: weakref.WeakSet[ReadGroup] = weakref.WeakSet()
_alive: weakref.WeakSet[AsyncReadGroup] = weakref.WeakSet()


def _after_fork() -> None:
    # The parent's readers (and a holder of a group lock) do not exist in the child.
    for group in list(_live):
        group._lock = threading.RLock()
        group._reads = {}
    for agroup in list(_alive):
        agroup._lock = threading.RLock()
        agroup._loops = weakref.WeakKeyDictionary()
        agroup._last = (_no_loop, {})


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
